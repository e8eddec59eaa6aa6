"""A target module that logs while it is imported, then fails to import."""

import logging

logging.getLogger("kameo_test.import").warning("importing, about to fail")
raise RuntimeError("this module does not import")
