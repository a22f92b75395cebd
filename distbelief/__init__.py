"""distbelief: asynchronous parameter-server training in the style of DistBelief."""

__version__ = "0.1.0"
