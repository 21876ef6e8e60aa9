"""URL patterns with path converters, as the route column should show them."""

from __future__ import annotations

from django.urls import path

from . import views

urlpatterns = [
    path("items/<int:item_id>/", views.item),
    path("async/items/<int:item_id>/", views.async_item),
    path("health/", views.health),
    path("slow/", views.slow),
]
