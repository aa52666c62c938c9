"""`ossimport mount ADDRESS MOUNTPOINT`: an object store as a folder (FUSE, through mfusepy).

  meta.py       names, sizes, mtimes: directories from key prefixes, caches with short TTLs
  readahead.py  reads: ranged GETs with a doubling read-ahead window and a shared memory budget
  spool.py      writes: spooled to a local file, uploaded and verified on close/fsync
  fs.py         the FUSE operations, mapping each to the above (and refusing what a store cannot do)
  command.py    the `mount` / `umount` commands: checks before daemonising, pid files, unmount

Built on the storage contract only (ossimport/storage) and the engine's transfer for uploads.
"""
