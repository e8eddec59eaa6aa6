"""A handler module that takes one second to import."""

import time

time.sleep(1.0)


def handler(msg):
    return msg
