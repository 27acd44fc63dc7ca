"""The libtorrent side: torrent layout, session settings, alert events, downloads, and the
session that owns them with its alert pump."""
