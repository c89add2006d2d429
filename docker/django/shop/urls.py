import os
import socket

from django.db import connection
from django.http import HttpResponse, JsonResponse
from django.urls import path

# Must match HEALTH_PATH in register.py (and the compose test checks it).
HEALTH_PATH = "healthz"


def index(request):
    with connection.cursor() as cur:
        cur.execute("SELECT now()")
        (now,) = cur.fetchone()
    return JsonResponse({
        "served_by": os.environ.get("SERVICE_ID", socket.gethostname()),
        "db_time": now.isoformat(),
        "forwarded_for": request.headers.get("X-Forwarded-For"),
    })


def healthz(request):
    try:
        with connection.cursor() as cur:
            cur.execute("SELECT 1")
    except Exception as e:  # the database is part of this app's health
        return HttpResponse(f"database: {e}\n", status=503, content_type="text/plain")
    return HttpResponse("ok\n", content_type="text/plain")


urlpatterns = [
    path("", index),
    path(HEALTH_PATH, healthz),
]
