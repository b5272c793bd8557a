"""Browser sessions (issue 14, being built): sealed cookies first; sign-in, refresh and logout
come on top of them."""
