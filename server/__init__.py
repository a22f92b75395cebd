"""Parameter shards and update rules (installed as ``distbelief.server``)."""
