"""BigQuery connection settings, and the one switch that points every client at an emulator.

``--bigquery_endpoint http://127.0.0.1:9050`` makes Beam's BigQuery I/O (its
apitools client and the google-cloud-bigquery client it uses for streaming
inserts) and this project's own google-cloud-bigquery clients talk to a local
BigQuery emulator with anonymous credentials. Nothing else changes between
emulator and cloud. The switch is process-wide: it serves the DirectRunner;
Dataflow workers never see it (there is no emulator in the cloud).
"""
from __future__ import annotations

import argparse
import os
import socket
from typing import Optional

from apache_beam.options.pipeline_options import GoogleCloudOptions, PipelineOptions

_ENDPOINT: Optional[str] = None


class BigQueryOptions(PipelineOptions):
    """Where the BigQuery dataset is, and an optional emulator endpoint."""

    @classmethod
    def _add_argparse_args(cls, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--bigquery_endpoint", default=None,
                            help="Base URL of a BigQuery emulator (e.g. http://127.0.0.1:9050): "
                                 "every BigQuery client of the job uses it, with anonymous "
                                 "credentials. Leave unset on Google Cloud.")
        parser.add_argument("--bigquery_storage_endpoint", default=None,
                            help="host:port of the emulator's Storage Read API (gRPC), for "
                                 "DIRECT_READ sources; only with --bigquery_endpoint.")


def use_bigquery_endpoint(endpoint: str, project: str,
                          storage_endpoint: Optional[str] = None) -> None:
    """Point Beam's and google-cloud-bigquery's clients at ``endpoint`` (idempotent)."""
    global _ENDPOINT
    endpoint = endpoint.rstrip("/")
    if "://" not in endpoint:
        endpoint = "http://" + endpoint
    # google-cloud-bigquery's Client() (used by Beam for insertAll) reads this variable.
    os.environ["BIGQUERY_EMULATOR_HOST"] = endpoint
    os.environ.setdefault("GOOGLE_CLOUD_PROJECT", project)

    import google.auth
    from google.auth.credentials import AnonymousCredentials

    def anonymous(scopes=None, request=None, quota_project_id=None, default_scopes=None):
        return AnonymousCredentials(), project

    google.auth.default = anonymous
    from apache_beam.internal.gcp import auth as beam_auth
    beam_auth._Credentials._credentials_init = False  # Beam caches credentials per process
    beam_auth._Credentials._credentials = None

    from apache_beam.io.gcp.internal.clients.bigquery import bigquery_v2_client
    bigquery_v2_client.BigqueryV2.BASE_URL = endpoint + "/bigquery/v2/"
    _guard_temp_dataset_cleanup()
    if storage_endpoint:
        _use_storage_endpoint(storage_endpoint)
    _ENDPOINT = endpoint


def _guard_temp_dataset_cleanup() -> None:
    """Only ever delete Beam's own temporary datasets.

    ReadFromBigQuery cleans up by listing datasets with a label filter and
    deleting each one returned; the emulator ignores the filter, so unguarded
    it would delete every dataset in the project.
    """
    from apache_beam.io.gcp import bigquery_tools
    wrapper = bigquery_tools.BigQueryWrapper
    if getattr(wrapper, "_emulator_guarded", False):
        return
    original = wrapper._clean_up_beam_labelled_temporary_datasets

    def guarded(self, project_id, dataset_id=None, table_id=None, labels=None):
        if labels is not None and not self.is_user_configured_dataset():
            from apache_beam.io.gcp.internal.clients import bigquery as api
            listed = self.client.datasets.List(api.BigqueryDatasetsListRequest(
                projectId=project_id)).datasets
            for dataset in listed:
                name = dataset.datasetReference.datasetId
                if name.startswith(wrapper.TEMP_DATASET):
                    self._delete_dataset(project_id, name, True)
            return
        original(self, project_id, dataset_id, table_id, labels)

    wrapper._clean_up_beam_labelled_temporary_datasets = guarded
    wrapper._emulator_guarded = True


def _use_storage_endpoint(host_port: str) -> None:
    """Route Beam's Storage Read API client (DIRECT_READ) to the emulator's gRPC port."""
    import types

    import grpc
    from apache_beam.io.gcp import bigquery as beam_bigquery
    from google.cloud import bigquery_storage_v1 as real
    from google.cloud.bigquery_storage_v1.services.big_query_read.transports import (
        BigQueryReadGrpcTransport)

    def client(*_args, **_kwargs):
        channel = grpc.insecure_channel(host_port,
                                        options=[("grpc.max_receive_message_length", -1)])
        return real.BigQueryReadClient(transport=BigQueryReadGrpcTransport(channel=channel))

    shim = types.ModuleType("bigquery_storage_emulator")
    shim.__dict__.update(real.__dict__)
    shim.BigQueryReadClient = client
    beam_bigquery.bq_storage = shim


def unreachable(endpoint: str, timeout: float = 5.0) -> Optional[str]:
    """Why ``endpoint`` (a BigQuery emulator URL or host:port) is unreachable, or None.

    One TCP connect with a timeout: clients otherwise retry an endpoint that
    is down for about ten minutes before the job fails.
    """
    from urllib.parse import urlsplit
    url = urlsplit(endpoint if "://" in endpoint else "http://" + endpoint)
    try:
        port = url.port or (443 if url.scheme == "https" else 80)
    except ValueError as err:
        return f"bad address: {err}"
    if not url.hostname:
        return "no host in the address"
    try:
        with socket.create_connection((url.hostname, port), timeout=timeout):
            return None
    except socket.timeout:
        return f"no answer from {url.hostname}:{port} within {timeout:g} s"
    except OSError as err:
        return f"{url.hostname}:{port}: {err.strerror or err}"


def apply_options(options: PipelineOptions) -> Optional[str]:
    """Apply ``--bigquery_endpoint`` if given; returns the endpoint in use (None on the cloud)."""
    settings = options.view_as(BigQueryOptions)
    if settings.bigquery_endpoint:
        project = options.view_as(GoogleCloudOptions).project or "test-project"
        use_bigquery_endpoint(settings.bigquery_endpoint, project,
                              settings.bigquery_storage_endpoint)
    return settings.bigquery_endpoint


def client(project: Optional[str], endpoint: Optional[str] = None):
    """A google-cloud-bigquery client: the emulator's when an endpoint is set, else the cloud's."""
    from google.cloud import bigquery
    endpoint = endpoint or _ENDPOINT
    if not endpoint:
        return bigquery.Client(project=project)
    from google.api_core.client_options import ClientOptions
    from google.auth.credentials import AnonymousCredentials
    return bigquery.Client(project=project or "test-project",
                           credentials=AnonymousCredentials(),
                           client_options=ClientOptions(api_endpoint=endpoint))
