"""ossimport: migrate and synchronise data between file systems and object stores."""

__version__ = "0.1.0"
