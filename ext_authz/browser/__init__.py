"""Browser sign-in in the Check (README: Browser sign-in): ``flow`` decides, ``pages`` answers."""

from ext_authz.browser.flow import Browsers, Found

__all__ = ["Browsers", "Found"]
