"""Worker replicas (installed as ``distbelief.workers``)."""
