"""Register this app instance in the local Consul agent with an HTTP health
check, run gunicorn, and deregister when the container stops (SIGTERM)."""
import json
import os
import signal
import subprocess
import sys
import urllib.request

CONSUL = os.environ.get("CONSUL_HTTP_ADDR", "http://consul:8500")
SERVICE = os.environ.get("SERVICE_NAME", "web")
SERVICE_ID = os.environ["SERVICE_ID"]
ADDRESS = os.environ["SERVICE_ADDRESS"]
PORT = int(os.environ.get("PORT", "8000"))
# Must match HEALTH_PATH in shop/urls.py.
HEALTH_PATH = "/healthz"


def consul(method, path, body=None):
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(CONSUL + path, data=data, method=method)
    with urllib.request.urlopen(req, timeout=5) as r:
        return r.status


def main():
    gunicorn = subprocess.Popen([
        "gunicorn", "--bind", f"0.0.0.0:{PORT}", "--workers", "2",
        "--access-logfile", "-", "shop.wsgi:application",
    ])
    consul("PUT", "/v1/agent/service/register", {
        "ID": SERVICE_ID,
        "Name": SERVICE,
        "Address": ADDRESS,
        "Port": PORT,
        "Check": {
            "HTTP": f"http://{ADDRESS}:{PORT}{HEALTH_PATH}",
            "Interval": "1s",
            "Timeout": "1s",
            "DeregisterCriticalServiceAfter": "1m",
        },
    })
    print(f"registered {SERVICE_ID} ({SERVICE}) at {ADDRESS}:{PORT}", flush=True)

    def stop(signum, frame):
        try:
            consul("PUT", f"/v1/agent/service/deregister/{SERVICE_ID}")
            print(f"deregistered {SERVICE_ID}", flush=True)
        finally:
            gunicorn.send_signal(signal.SIGTERM)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    sys.exit(gunicorn.wait())


if __name__ == "__main__":
    main()
