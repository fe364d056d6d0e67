"""Observability: the request-outcome record, metrics, the access log, payload capture.

``record``  RequestInfo (filled while a request runs) and RequestOutcome (what the sinks read)
``middleware``  the request id and the recording of every request; the Observability sinks
``metrics``  running totals, the rolling window, Prometheus
``access_log``  one JSON line per request, written off the loop
``capture``  request and response bodies for debugging (off by default)
``writer``  the one off-loop writer thread the access log and capture share

Only ``record`` is imported here: errors and routes need it, and it needs
nothing of the rest of the core.
"""

from .record import REQUEST_INFO, RequestInfo, RequestOutcome, current_request_id, request_info

__all__ = ["REQUEST_INFO", "RequestInfo", "RequestOutcome", "current_request_id", "request_info"]
