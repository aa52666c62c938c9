"""What to copy and how: listing merge, policy, transfer, throttling and counters.

The engine knows nothing of ZeroMQ, job directories or the CLI: front ends hand it two Storage
roots and either a listing or an explicit list of keys.
"""
