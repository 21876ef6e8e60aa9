"""What both realistic apps share: the settings, the database, the models, telemetry."""

from __future__ import annotations

import gc
import os
import random
import time
from decimal import Decimal
from pathlib import Path

from opentelemetry import trace
from opentelemetry.instrumentation.sqlalchemy import SQLAlchemyInstrumentor
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter
from pydantic import BaseModel, ConfigDict
from sqlalchemy import ForeignKey, Numeric, String, create_engine, func, select
from sqlalchemy.engine import Engine
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, relationship

__all__ = [
    "CATEGORIES",
    "PRODUCTS",
    "TEMPLATES",
    "UPSTREAM_URL",
    "VARIANT",
    "CategoryStats",
    "ProductOut",
    "build_database",
    "category_page",
    "engine",
    "gc_stats",
    "setup_telemetry",
]

VARIANTS = ("otel", "ours")
VARIANT = os.environ.get("REALAPP_VARIANT", "otel")
if VARIANT not in VARIANTS:
    raise ValueError(f"REALAPP_VARIANT must be one of {VARIANTS}, got {VARIANT!r}")
UPSTREAM_URL = os.environ.get("REALAPP_UPSTREAM", "http://127.0.0.1:8799/quote")
TEMPLATES = Path(__file__).resolve().parent / "templates"
CATEGORIES = 40
PRODUCTS = 4000
PAGE_SIZE = 50


class Base(DeclarativeBase):
    pass


class Category(Base):
    __tablename__ = "categories"
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(60))
    products: Mapped[list[Product]] = relationship(back_populates="category")


class Product(Base):
    __tablename__ = "products"
    id: Mapped[int] = mapped_column(primary_key=True)
    sku: Mapped[str] = mapped_column(String(20), unique=True)
    name: Mapped[str] = mapped_column(String(120))
    description: Mapped[str] = mapped_column(String(500))
    price: Mapped[Decimal] = mapped_column(Numeric(10, 2))
    stock: Mapped[int]
    category_id: Mapped[int] = mapped_column(ForeignKey("categories.id"), index=True)
    category: Mapped[Category] = relationship(back_populates="products")


class ProductOut(BaseModel):
    """The API's view of a product (``from_attributes``: built from the ORM row)."""

    model_config = ConfigDict(from_attributes=True)
    id: int
    sku: str
    name: str
    description: str
    price: Decimal
    stock: int
    category_name: str


class CategoryStats(BaseModel):
    count: int
    average_price: Decimal
    in_stock: int


def build_database(path: str) -> None:
    """A SQLite file with ``CATEGORIES`` categories and ``PRODUCTS`` products (seeded)."""
    rng = random.Random(14)
    db = create_engine(f"sqlite:///{path}")
    Base.metadata.drop_all(db)
    Base.metadata.create_all(db)
    words = ("red", "blue", "steel", "oak", "compact", "deluxe")
    words += ("quiet", "smart", "solar", "travel", "mini", "pro")
    with Session(db) as session:
        session.add_all(Category(id=i, name=f"Category {i}") for i in range(1, CATEGORIES + 1))
        session.add_all(
            Product(
                id=i,
                sku=f"SKU-{i:06d}",
                name=" ".join(rng.choices(words, k=3)).title(),
                description=" ".join(rng.choices(words, k=40)),
                price=Decimal(rng.randrange(199, 99999)) / 100,
                stock=rng.randrange(0, 500),
                category_id=rng.randrange(1, CATEGORIES + 1),
            )
            for i in range(1, PRODUCTS + 1)
        )
        session.commit()
    db.dispose()


def engine() -> Engine:
    """The app's engine on ``REALAPP_DB`` (a pool of connections shared by threads)."""
    return create_engine(
        f"sqlite:///{os.environ['REALAPP_DB']}",
        connect_args={"check_same_thread": False},
        pool_size=8,
    )


def category_products(session: Session, category_id: int) -> list[ProductOut]:
    rows = session.execute(
        select(Product, Category.name)
        .join(Category)
        .where(Product.category_id == category_id)
        .order_by(Product.price.desc())
        .limit(PAGE_SIZE)
    ).all()
    return [
        ProductOut.model_validate(
            {
                **{k: getattr(p, k) for k in ProductOut.model_fields if k != "category_name"},
                "category_name": name,
            }
        )
        for p, name in rows
    ]


def category_page(session: Session, category_id: int) -> tuple[list[ProductOut], CategoryStats]:
    """The page's products and the category's aggregate (two queries)."""
    count, average, in_stock = session.execute(
        select(
            func.count(Product.id),
            func.avg(Product.price),
            func.sum(Product.stock > 0),
        ).where(Product.category_id == category_id)
    ).one()
    stats = CategoryStats(
        count=count, average_price=Decimal(str(round(average or 0, 2))), in_stock=in_stock or 0
    )
    return category_products(session, category_id), stats


class _Dropping(SpanExporter):
    def export(self, spans: object) -> object:  # type: ignore[override]
        from opentelemetry.sdk.trace.export import SpanExportResult

        return SpanExportResult.SUCCESS

    def shutdown(self) -> None:
        return None


def setup_telemetry(service: str, db: Engine) -> TracerProvider:
    """The SDK as users set it up: OTLP/HTTP exporter (or a dropping one), SQLAlchemy spans."""
    provider = TracerProvider(resource=Resource.create({"service.name": service}))
    exporter: SpanExporter
    if os.environ.get("REALAPP_EXPORTER", "otlp") == "otlp":
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        exporter = OTLPSpanExporter()  # OTEL_EXPORTER_OTLP_ENDPOINT: bench.otlp_sink
    else:
        exporter = _Dropping()
    provider.add_span_processor(BatchSpanProcessor(exporter))
    trace.set_tracer_provider(provider)
    SQLAlchemyInstrumentor().instrument(engine=db, tracer_provider=provider)
    return provider


_gc_time = [0.0, 0.0]  # seconds in collections, start of the current one


def _on_gc(phase: str, info: dict[str, int]) -> None:
    if phase == "start":
        _gc_time[1] = time.perf_counter()
    else:
        _gc_time[0] += time.perf_counter() - _gc_time[1]


gc.callbacks.append(_on_gc)


def gc_stats() -> dict[str, object]:
    """Collections per generation, seconds spent in them since start, and the objects the
    collector tracks now (``/_bench/gc``)."""
    return {"seconds": _gc_time[0], "generations": gc.get_stats(), "tracked": len(gc.get_objects())}
