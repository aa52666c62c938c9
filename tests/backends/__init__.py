"""One module per backend under test; see tests/conftest.py for what each defines."""
