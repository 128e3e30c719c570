"""receiver: submit VLM Run jobs, receive their callbacks, record them durably, forward them."""

__version__ = "0.1.0"
