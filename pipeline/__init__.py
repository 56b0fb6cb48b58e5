"""leakpipe's library: math in small pure functions, I/O and caching in their own modules."""

__version__ = "0.1.0"
