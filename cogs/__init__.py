"""Discord extensions shipped with admin-ops."""
