"""A handler module that starts a thread when it is imported (a zygote must not fork it)."""

import threading
import time

threading.Thread(target=time.sleep, args=(3600,), name="import-time", daemon=True).start()


def echo(msg):
    return msg
