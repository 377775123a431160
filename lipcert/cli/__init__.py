"""The ``lipcert`` command: flags over the config file, progress on stderr, exit codes; the API does the work."""
