"""A settings-less Django WSGI app (``django.conf.settings.configure``), for
``serve_wsgi`` / ``npipe serve-wsgi django_app:app``.

GET /caller -> JSON of environ["npipe.caller"] (request.META holds the environ)
"""

from __future__ import annotations

from typing import Any

from django.conf import settings

if not settings.configured:
    settings.configure(
        DEBUG=False, SECRET_KEY="npipe-tests", ALLOWED_HOSTS=["*"], ROOT_URLCONF=__name__,
        MIDDLEWARE=[], INSTALLED_APPS=[], DATABASES={},
    )

from django.core.wsgi import get_wsgi_application
from django.http import HttpRequest, JsonResponse
from django.urls import path


def caller(request: HttpRequest) -> JsonResponse:
    who = request.META.get("npipe.caller")
    out: dict[str, Any] = {"framework": "django"}
    if who is not None:
        out.update(transport=who.transport, uid=who.uid, name=who.name)
    return JsonResponse(out)


urlpatterns = [path("caller", caller)]
app = get_wsgi_application()
