#!/usr/bin/env python3
"""Check oxserve's TensorFlow Serving .proto files against the published 2.21 definitions.

oxserve writes its own copies of the TF Serving gRPC API under proto/ (tensorflow_serving/...
and tensorflow/core/...). They have to match the published ones field for field, so that the
PyPI `tensorflow-serving-api` client stubs talk to the server unchanged. This script compiles
our files with protoc (grpcio-tools) and compares every message, enum and service they define
with the descriptors of the installed published stubs (tensorflow + tensorflow-serving-api
2.21): for each field its name, number, type, label, type name, oneof, proto3 `optional`, JSON
name and options; enum values; reserved ranges and names; map entries; for each service its
methods with their input/output types and streaming flags.

Usage (needs the TensorFlow venv made by scripts/setup-tensorflow.sh, plus grpcio-tools either
in that venv or in another Python named by --protoc-python or $PROTOC_PYTHON):

    python3 -m venv /tmp/protocheck && /tmp/protocheck/bin/pip install grpcio-tools
    $HOME/.cache/oxserve/venv-tf/bin/python scripts/check_tf_protos.py \\
        --protoc-python /tmp/protocheck/bin/python

Exit status: 0 when the only differences are the deliberate ones listed in DELIBERATE below
(reported as "omitted"), 1 on any other difference, 2 on a setup problem.

Not compared on purpose: file-level options (java_package, go_package, cc_enable_arenas: no
effect on the wire or on the Rust code), comments, declaration order, and the import lists.
tensorflow_serving/servables/tensorflow/session_bundle_config.proto has no published Python
stub, so it can only be compiled here, not compared.
"""

import argparse
import importlib
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# Differences we chose, keyed by our file name. Each is printed as "omitted", not as a failure.
DELIBERATE = {
    # Partial meta_graph.proto: only TensorInfo and SignatureDef (what GetModelMetadata
    # returns). MetaGraphDef drags in graph/op_def/saver/saved_object_graph.
    "tensorflow/core/protobuf/meta_graph.proto": {
        "missing_types": {"tensorflow.MetaGraphDef", "tensorflow.CollectionDef",
                          "tensorflow.AssetFileDef"},
    },
    # In 2.21 this file is a forwarding stub (package tensorflow.error.dummy, `import public
    # "xla/tsl/protobuf/error_codes.proto"`). Ours defines tensorflow.error.Code directly.
    "tensorflow/core/protobuf/error_codes.proto": {
        "package": "tensorflow.error",
    },
}

# Our files without a published Python stub: compiled, not compared.
NO_PUBLISHED_STUB = {
    # Partial: BatchingParameters only (SessionBundleConfig needs config.proto's ConfigProto).
    "tensorflow_serving/servables/tensorflow/session_bundle_config.proto",
}


def fail_setup(msg):
    print(f"check_tf_protos: {msg}", file=sys.stderr)
    sys.exit(2)


def protoc_python(arg):
    if arg:
        return arg
    if os.environ.get("PROTOC_PYTHON"):
        return os.environ["PROTOC_PYTHON"]
    try:
        import grpc_tools  # noqa: F401
        return sys.executable
    except ImportError:
        fail_setup("grpcio-tools not importable here; pass --protoc-python or set PROTOC_PYTHON")


def compile_ours(py, proto_root):
    from google.protobuf import descriptor_pb2

    files = sorted(
        str(p.relative_to(proto_root))
        for sub in ("tensorflow", "tensorflow_serving")
        for p in (proto_root / sub).rglob("*.proto")
    )
    if not files:
        fail_setup(f"no .proto files under {proto_root}/tensorflow*")
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "ours.pb"
        cmd = [py, "-m", "grpc_tools.protoc", f"-I{proto_root}", f"--descriptor_set_out={out}",
               "--include_imports", *files]
        res = subprocess.run(cmd, capture_output=True, text=True)
        if res.returncode != 0 or res.stderr.strip():
            print(res.stderr, file=sys.stderr)
            if res.returncode != 0:
                fail_setup("protoc failed on our files")
        fds = descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes())
    return files, {f.name: f for f in fds.file}


def published_pool():
    from google.protobuf import descriptor_pool
    return descriptor_pool.Default()


def import_published(file_name):
    mod = file_name[: -len(".proto")].replace("/", ".") + "_pb2"
    try:
        return importlib.import_module(mod)
    except ImportError:
        return None


def json_default(name):
    # protoc's ToJsonName: drop underscores, upper-case the letter after each one.
    out, up = [], False
    for c in name:
        if c == "_":
            up = True
        elif up:
            out.append(c.upper())
            up = False
        else:
            out.append(c)
    return "".join(out)


def file_proto_of(desc):
    from google.protobuf import descriptor_pb2
    return descriptor_pb2.FileDescriptorProto.FromString(desc.file.serialized_pb)


def find_in_file(fp, full_name):
    """Locate a DescriptorProto / EnumDescriptorProto / ServiceDescriptorProto by full name."""
    prefix = fp.package + "." if fp.package else ""
    if not full_name.startswith(prefix):
        return None
    parts = full_name[len(prefix):].split(".")
    scopes = [(fp.message_type, fp.enum_type, fp.service)]
    node = None
    for i, part in enumerate(parts):
        msgs, enums, services = scopes[-1]
        node = next((m for m in msgs if m.name == part), None)
        if node is not None:
            scopes.append((node.nested_type, node.enum_type, ()))
            continue
        if i == len(parts) - 1:
            node = next((e for e in enums if e.name == part), None) or \
                next((s for s in services if s.name == part), None)
        if node is None:
            return None
    return node


class Report:
    def __init__(self):
        self.diffs, self.omitted, self.ok = [], [], []

    def diff(self, what):
        self.diffs.append(what)

    def omit(self, what):
        self.omitted.append(what)


def opts(o):
    return o.SerializeToString(deterministic=True) if o.ByteSize() else b""


def fmt_opts(o):
    return "{" + str(o).strip().replace("\n", ", ") + "}" if o.ByteSize() else "{}"


def compare_enum(rep, full, ours, theirs):
    ov = {v.number: v for v in ours.value}
    tv = {v.number: v for v in theirs.value}
    for num in sorted(set(ov) | set(tv)):
        a, b = ov.get(num), tv.get(num)
        if a is None:
            rep.diff(f"{full}: enum value {b.name} = {num} missing in ours")
        elif b is None:
            rep.diff(f"{full}: enum value {a.name} = {num} not in the published enum")
        elif a.name != b.name or opts(a.options) != opts(b.options):
            rep.diff(f"{full}: enum value {num}: ours {a.name} {fmt_opts(a.options)}, "
                     f"published {b.name} {fmt_opts(b.options)}")
    if [(r.start, r.end) for r in ours.reserved_range] != \
            [(r.start, r.end) for r in theirs.reserved_range] or \
            list(ours.reserved_name) != list(theirs.reserved_name):
        rep.diff(f"{full}: reserved ranges/names differ")
    if opts(ours.options) != opts(theirs.options):
        rep.diff(f"{full}: enum options ours {fmt_opts(ours.options)}, "
                 f"published {fmt_opts(theirs.options)}")
    return len(ov)


def field_sig(f, msg):
    oneof = msg.oneof_decl[f.oneof_index].name if f.HasField("oneof_index") else None
    return {
        "name": f.name,
        "type": f.Type.Name(f.type),
        "label": f.Label.Name(f.label),
        "type_name": f.type_name,
        "oneof": oneof,
        "proto3_optional": f.proto3_optional,
        "json_name": f.json_name if f.HasField("json_name") else json_default(f.name),
        "default": f.default_value if f.HasField("default_value") else None,
        "options": fmt_opts(f.options),
        "extendee": f.extendee,
    }


def compare_message(rep, full, ours, theirs, counts):
    of = {f.number: f for f in ours.field}
    tf = {f.number: f for f in theirs.field}
    for num in sorted(set(of) | set(tf)):
        a, b = of.get(num), tf.get(num)
        if a is None:
            rep.diff(f"{full}: field {b.name} = {num} missing in ours")
            continue
        if b is None:
            rep.diff(f"{full}: field {a.name} = {num} not in the published message")
            continue
        sa, sb = field_sig(a, ours), field_sig(b, theirs)
        for key in sa:
            if sa[key] != sb[key]:
                rep.diff(f"{full}.{a.name} (= {num}): {key} ours {sa[key]!r}, "
                         f"published {sb[key]!r}")
        counts["fields"] += 1
    if [(r.start, r.end) for r in ours.reserved_range] != \
            [(r.start, r.end) for r in theirs.reserved_range] or \
            sorted(ours.reserved_name) != sorted(theirs.reserved_name):
        rep.diff(f"{full}: reserved ours {[(r.start, r.end - 1) for r in ours.reserved_range]} "
                 f"{list(ours.reserved_name)}, published "
                 f"{[(r.start, r.end - 1) for r in theirs.reserved_range]} "
                 f"{list(theirs.reserved_name)}")
    if sorted(o.name for o in ours.oneof_decl) != sorted(o.name for o in theirs.oneof_decl):
        rep.diff(f"{full}: oneofs ours {[o.name for o in ours.oneof_decl]}, "
                 f"published {[o.name for o in theirs.oneof_decl]}")
    if opts(ours.options) != opts(theirs.options):
        rep.diff(f"{full}: message options ours {fmt_opts(ours.options)}, "
                 f"published {fmt_opts(theirs.options)}")
    if ours.extension_range or theirs.extension_range or ours.extension or theirs.extension:
        if [(r.start, r.end) for r in ours.extension_range] != \
                [(r.start, r.end) for r in theirs.extension_range]:
            rep.diff(f"{full}: extension ranges differ")
    on = {m.name: m for m in ours.nested_type}
    tn = {m.name: m for m in theirs.nested_type}
    for name in sorted(set(on) | set(tn)):
        if name not in on:
            rep.diff(f"{full}.{name}: nested message missing in ours")
        elif name not in tn:
            rep.diff(f"{full}.{name}: nested message not in the published message")
        else:
            compare_message(rep, f"{full}.{name}", on[name], tn[name], counts)
            counts["messages"] += 1
    oe = {e.name: e for e in ours.enum_type}
    te = {e.name: e for e in theirs.enum_type}
    for name in sorted(set(oe) | set(te)):
        if name not in oe:
            rep.diff(f"{full}.{name}: nested enum missing in ours")
        elif name not in te:
            rep.diff(f"{full}.{name}: nested enum not in the published message")
        else:
            counts["enum_values"] += compare_enum(rep, f"{full}.{name}", oe[name], te[name])
            counts["enums"] += 1


def compare_service(rep, full, ours, theirs):
    om = {m.name: m for m in ours.method}
    tm = {m.name: m for m in theirs.method}
    for name in sorted(set(om) | set(tm)):
        a, b = om.get(name), tm.get(name)
        if a is None:
            rep.diff(f"{full}.{name}: rpc missing in ours")
        elif b is None:
            rep.diff(f"{full}.{name}: rpc not in the published service")
        else:
            for key in ("input_type", "output_type", "client_streaming", "server_streaming"):
                if getattr(a, key) != getattr(b, key):
                    rep.diff(f"{full}.{name}: {key} ours {getattr(a, key)!r}, "
                             f"published {getattr(b, key)!r}")
    return len(om)


def top_level_names(fp):
    pre = fp.package + "." if fp.package else ""
    return ([("message", pre + m.name, m) for m in fp.message_type]
            + [("enum", pre + e.name, e) for e in fp.enum_type]
            + [("service", pre + s.name, s) for s in fp.service])


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--protoc-python", help="a Python with grpcio-tools (default: this one)")
    ap.add_argument("--proto-root", default=str(ROOT / "proto"))
    args = ap.parse_args()
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")  # quieter `import tensorflow`
    from google.protobuf import descriptor_pb2
    proto_root = Path(args.proto_root).resolve()

    py = protoc_python(args.protoc_python)
    files, ours_by_name = compile_ours(py, proto_root)
    pool = published_pool()
    rep = Report()
    counts = {"messages": 0, "enums": 0, "enum_values": 0, "fields": 0, "services": 0, "rpcs": 0}

    for name in files:
        ofp = ours_by_name[name]
        delib = DELIBERATE.get(name, {})
        if name in NO_PUBLISHED_STUB:
            types = ", ".join(n for _, n, _ in top_level_names(ofp))
            rep.omit(f"{name}: no published Python stub; compiled only ({types})")
            continue
        mod = import_published(name)
        if mod is None:
            rep.diff(f"{name}: no published module {name[:-6].replace('/', '.')}_pb2 to "
                     "compare with")
            continue
        pfp = descriptor_pb2.FileDescriptorProto.FromString(mod.DESCRIPTOR.serialized_pb)
        if ofp.package != pfp.package:
            if delib.get("package") == ofp.package:
                rep.omit(f"{name}: package {ofp.package!r} (published file: package "
                         f"{pfp.package!r}, forwarding via import public "
                         f"{list(pfp.dependency)}); the types are compared by full name")
            else:
                rep.diff(f"{name}: package ours {ofp.package!r}, published {pfp.package!r}")
        if ofp.syntax != pfp.syntax:
            rep.diff(f"{name}: syntax ours {ofp.syntax!r}, published {pfp.syntax!r}")

        ours_names = set()
        for kind, full, node in top_level_names(ofp):
            ours_names.add(full)
            try:
                if kind == "message":
                    pdesc = pool.FindMessageTypeByName(full)
                elif kind == "enum":
                    pdesc = pool.FindEnumTypeByName(full)
                else:
                    pdesc = pool.FindServiceByName(full)
            except KeyError:
                rep.diff(f"{full} ({kind}, {name}): not in the published descriptors")
                continue
            theirs_fp = file_proto_of(pdesc)
            if theirs_fp.name != name:
                rep.omit(f"{full}: published in {theirs_fp.name}, ours in {name}")
            theirs = find_in_file(theirs_fp, full)
            before = len(rep.diffs)
            if kind == "message":
                n_before = counts["fields"]
                compare_message(rep, full, node, theirs, counts)
                counts["messages"] += 1
                detail = f"{counts['fields'] - n_before} fields"
            elif kind == "enum":
                n_values = compare_enum(rep, full, node, theirs)
                detail = f"{n_values} values"
                counts["enums"] += 1
                counts["enum_values"] += n_values
            else:
                detail = f"{compare_service(rep, full, node, theirs)} rpcs"
                counts["services"] += 1
                counts["rpcs"] += len(node.method)
            if len(rep.diffs) == before:
                rep.ok.append(f"{kind} {full} ({detail}, nested types included)")

        # Published top-level types of this file that we did not write.
        for kind, full, _ in top_level_names(pfp):
            if full in ours_names:
                continue
            if full in delib.get("missing_types", ()):
                rep.omit(f"{full} ({kind}): left out of {name} on purpose")
            else:
                rep.diff(f"{full} ({kind}): published in {name} but missing in ours")

    for line in rep.ok:
        print(f"ok       {line}")
    for line in rep.omitted:
        print(f"omitted  {line}")
    for line in rep.diffs:
        print(f"DIFF     {line}")
    print(f"\n{len(files)} files compiled; compared {counts['messages']} messages "
          f"({counts['fields']} fields), {counts['enums']} enums ({counts['enum_values']} "
          f"values), {counts['services']} services ({counts['rpcs']} rpcs): "
          f"{len(rep.diffs)} unexpected difference(s), {len(rep.omitted)} deliberate.")
    return 1 if rep.diffs else 0


if __name__ == "__main__":
    sys.exit(main())
