"""REST API areas, each one RouteTableDef mounted under /api/v1/."""
