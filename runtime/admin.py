"""`recship.v1.BundleAdmin`: the operator API (list, refresh, load, unload, pin, label).

Served on the admin listener only, never on the inference port (`recship.runtime.server`):
behind `BearerTokenInterceptor` when a token is configured, on loopback or a Unix socket
otherwise (`recship.runtime.security`). Like the inference servicer it only translates:
manager snapshots -> admin.proto, requests -> `VersionManager` calls; errors are raised as
`RecshipError`s and mapped to status codes by `ErrorMappingInterceptor`.

Failure reasons come from the manager, which bounds them; nothing here echoes a bundle's
strings beyond what the manifest summary holds (validated manifests only).
"""

from __future__ import annotations

import grpc

from recship.base.errors import InvalidInput
from recship.protos.v1 import admin_pb2, admin_pb2_grpc, manifest_pb2
from recship.runtime.manager import VersionManager
from recship.runtime.policy import policy_from_proto, policy_to_proto
from recship.runtime.versions import BundleInfo, VersionInfo

# At most this many quality metrics of a manifest are summarised per version.
MAX_SUMMARY_METRICS = 64
# Free-text fields of a manifest are cut to this many characters in a summary.
MAX_SUMMARY_CHARS = 200


def _quantization(manifest: manifest_pb2.BundleManifest) -> str:
    names = sorted(
        {
            manifest_pb2.QuantDtype.Name(q.dtype).removeprefix("QUANT_DTYPE_").lower()
            for q in manifest.quantization
        }
    )
    return ",".join(names)


def _manifest_summary(manifest: manifest_pb2.BundleManifest) -> admin_pb2.ManifestSummary:
    summary = admin_pb2.ManifestSummary(
        release_id=manifest.release_id,
        quantization=_quantization(manifest),
        index=manifest.index.factory[:MAX_SUMMARY_CHARS],
        num_items=manifest.schema.num_items,
        device_count=manifest.sharding.device_count,
        size_bytes=sum(entry.size_bytes for entry in manifest.files),
    )
    summary.created_at.CopyFrom(manifest.created_at)
    metrics = sorted(manifest.quality.metrics.items())[:MAX_SUMMARY_METRICS]
    summary.quality.update(dict(metrics))
    return summary


def version_status(info: VersionInfo) -> admin_pb2.VersionStatus:
    """The admin.proto form of a version snapshot."""
    status = admin_pb2.VersionStatus(
        version=info.version,
        state=info.state.value,
        failure_reason=info.failure_reason,
        devices=list(info.devices),
        replicas=info.replicas,
        labels=list(info.labels),
        is_default=info.is_default,
    )
    if info.ready_at is not None:
        status.ready_at.FromNanoseconds(int(info.ready_at * 1e9))
    if info.manifest is not None:
        status.manifest.CopyFrom(_manifest_summary(info.manifest))
    return status


def bundle_status(info: BundleInfo) -> admin_pb2.BundleStatus:
    """The admin.proto form of a bundle snapshot."""
    return admin_pb2.BundleStatus(
        name=info.name,
        policy=policy_to_proto(info.policy),
        versions=[version_status(v) for v in info.versions],
    )


def _check_version(version: int) -> None:
    if version <= 0:
        raise InvalidInput(f"version: must be > 0, got {version}")


class BundleAdminService(admin_pb2_grpc.BundleAdminServicer):
    """Operator API over a `VersionManager`."""

    def __init__(self, manager: VersionManager) -> None:
        self.manager = manager

    async def ListBundles(
        self, request: admin_pb2.ListBundlesRequest, context: grpc.aio.ServicerContext
    ) -> admin_pb2.ListBundlesResponse:
        infos = self.manager.status(request.bundle)
        return admin_pb2.ListBundlesResponse(bundles=[bundle_status(i) for i in infos])

    async def RefreshRepository(
        self, request: admin_pb2.RefreshRepositoryRequest, context: grpc.aio.ServicerContext
    ) -> admin_pb2.RefreshRepositoryResponse:
        await self.manager.refresh()
        infos = self.manager.status()
        return admin_pb2.RefreshRepositoryResponse(bundles=[bundle_status(i) for i in infos])

    async def LoadVersion(
        self, request: admin_pb2.LoadVersionRequest, context: grpc.aio.ServicerContext
    ) -> admin_pb2.LoadVersionResponse:
        _check_version(request.version)
        info = await self.manager.load_version(request.bundle, request.version)
        return admin_pb2.LoadVersionResponse(status=version_status(info))

    async def UnloadVersion(
        self, request: admin_pb2.UnloadVersionRequest, context: grpc.aio.ServicerContext
    ) -> admin_pb2.UnloadVersionResponse:
        _check_version(request.version)
        info = await self.manager.unload_version(request.bundle, request.version)
        return admin_pb2.UnloadVersionResponse(status=version_status(info))

    async def SetVersionPolicy(
        self, request: admin_pb2.SetVersionPolicyRequest, context: grpc.aio.ServicerContext
    ) -> admin_pb2.SetVersionPolicyResponse:
        if not request.HasField("policy"):
            raise InvalidInput("policy: required")
        info = await self.manager.set_policy(request.bundle, policy_from_proto(request.policy))
        return admin_pb2.SetVersionPolicyResponse(bundle=bundle_status(info))

    async def SetLabel(
        self, request: admin_pb2.SetLabelRequest, context: grpc.aio.ServicerContext
    ) -> admin_pb2.SetLabelResponse:
        if request.version < 0:
            raise InvalidInput(f"version: must be >= 0, got {request.version}")
        info = self.manager.set_label(request.bundle, request.label, request.version)
        return admin_pb2.SetLabelResponse(bundle=bundle_status(info))
