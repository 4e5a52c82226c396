"""The HTTP side: the app's assembly (`app`), forwarding (`forwarding`), swapctl's own routes
(`admin`), who may talk to it (`guard`), errors into answers (`errors`), multipart forms
(`forms`) and the transport to the models' servers (`transport`)."""

from swapctl.proxy.app import build_app

__all__ = ["build_app"]
