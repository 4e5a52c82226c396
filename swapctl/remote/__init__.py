"""Models served elsewhere: peers and `proxy:` models (`elsewhere`), and where a request
goes (`places`)."""

from swapctl.remote.elsewhere import Circuit, Place, Watch
from swapctl.remote.places import VIA, Here, Places, Target, There

__all__ = ["VIA", "Circuit", "Here", "Place", "Places", "Target", "There", "Watch"]
