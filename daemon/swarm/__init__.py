"""The libtorrent side: torrent layout, session ownership and the alert pump."""
