"""
The edge: HTTP on the proxy's port. The site with its routes, deadlines,
turn budget and the hand-over of a connection to the WebSocket protocol
(L{site}), and the one decision on an upgrade request, whichever parser read
it (L{upgrade}).

Imports the WebSocket protocol, the session decisions and what lies below;
nothing below imports it.
"""
