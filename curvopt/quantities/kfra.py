"""KFRA placeholder (filled in below)."""


def propagate(col, lrec, recs, g_out):
    raise NotImplementedError


def factors(items):
    raise NotImplementedError
