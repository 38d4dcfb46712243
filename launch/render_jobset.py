#!/usr/bin/env python3
"""Render launch/jobset.yaml.tmpl for one run: a GKE JobSet with SLICES TPU slices of HOSTS_PER_SLICE hosts.

usage: python launch/render_jobset.py --name NAME --slices S --hosts-per-slice H --accelerator tpu-v5p-slice
           --topology 4x4x4 --image IMAGE [--chips-per-host 4] [--max-restarts 3] [--grace-seconds 300]
           [--env KEY=VALUE ...] [-o jobset.yaml] -- alm train --distributed auto CONFIG [key=value ...]

Checks the settings (topology chips = hosts per slice x chips per host, a DNS-safe name, a command) and
writes YAML that parses; `kubectl apply -f` it. With --slices > 1 every Pod also gets MEGASCALE_NUM_SLICES,
MEGASCALE_SLICE_ID (its child Job's index, from the JobSet label) and MEGASCALE_COORDINATOR_ADDRESS
(host 0 of slice 0: NAME-slice-0-0.NAME, the JobSet's headless-service name), which join the slices over
DCN; set mesh.dcn_data to the number of slices. Standard library only.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
from pathlib import Path
from string import Template

TEMPLATE = Path(__file__).with_name("jobset.yaml.tmpl")
ENV_INDENT = " " * 14
NAME_RE = re.compile(r"^[a-z]([-a-z0-9]{0,38}[a-z0-9])?$")   # DNS-1035, short enough for the Pod names


class SettingsError(ValueError):
    pass


def _env_entry(name: str, value: str | None = None, field: str | None = None) -> str:
    if field is not None:
        return (f"{ENV_INDENT}- name: {name}\n{ENV_INDENT}  valueFrom:\n{ENV_INDENT}    fieldRef:\n"
                f"{ENV_INDENT}      fieldPath: {json.dumps(field)}")
    return f"{ENV_INDENT}- name: {name}\n{ENV_INDENT}  value: {json.dumps(value)}"


def render(*, name: str, slices: int, hosts_per_slice: int, accelerator: str, topology: str, image: str,
           command: list[str], chips_per_host: int = 4, max_restarts: int = 3, grace_seconds: int = 300,
           env: dict[str, str] | None = None, template: str | None = None) -> str:
    """The JobSet YAML for these settings (a SettingsError names a wrong one)."""
    if not NAME_RE.match(name):
        raise SettingsError(f"--name {name!r}: lowercase letters, digits and '-', starting with a letter, "
                            "at most 40 characters")
    for key, v, low in (("--slices", slices, 1), ("--hosts-per-slice", hosts_per_slice, 1),
                        ("--chips-per-host", chips_per_host, 1), ("--max-restarts", max_restarts, 0),
                        ("--grace-seconds", grace_seconds, 0)):
        if not isinstance(v, int) or v < low:
            raise SettingsError(f"{key} {v!r}: an integer >= {low}")
    if not re.fullmatch(r"\d+(x\d+){1,2}", topology):
        raise SettingsError(f"--topology {topology!r}: chips per dimension, e.g. 2x2x4 (v5p) or 4x4 (v6e)")
    chips = math.prod(int(x) for x in topology.split("x"))
    if chips != hosts_per_slice * chips_per_host:
        raise SettingsError(f"--topology {topology} has {chips} chips but --hosts-per-slice {hosts_per_slice} x "
                            f"--chips-per-host {chips_per_host} = {hosts_per_slice * chips_per_host}")
    if not accelerator or not image:
        raise SettingsError("--accelerator (e.g. tpu-v5p-slice, tpu-v6e-slice) and --image are required")
    if not command:
        raise SettingsError("give the command after --, e.g. -- alm train --distributed auto /cfg/run.yaml")
    entries = [_env_entry("PYTHONUNBUFFERED", "1")]
    entries += [_env_entry(k, v) for k, v in (env or {}).items()]
    if slices > 1:
        entries += [_env_entry("MEGASCALE_NUM_SLICES", str(slices)),
                    _env_entry("MEGASCALE_SLICE_ID", field="metadata.labels['jobset.sigs.k8s.io/job-index']"),
                    _env_entry("MEGASCALE_COORDINATOR_ADDRESS", f"{name}-slice-0-0.{name}")]
    lines = (template if template is not None else TEMPLATE.read_text()).splitlines(keepends=True)
    while lines and lines[0].startswith("#"):       # the template's own header
        lines.pop(0)
    header = (f"# Rendered by launch/render_jobset.py from launch/jobset.yaml.tmpl: {slices} slice(s) x "
              f"{hosts_per_slice} host(s) x {chips_per_host} chips ({accelerator}, {topology}).\n")
    text = header + Template("".join(lines)).substitute(
        NAME=name, SLICES=slices, HOSTS_PER_SLICE=hosts_per_slice, ACCELERATOR=accelerator, TOPOLOGY=topology,
        IMAGE=json.dumps(image), COMMAND=json.dumps(list(command)), CHIPS_PER_HOST=chips_per_host,
        MAX_RESTARTS=max_restarts, GRACE_SECONDS=grace_seconds, ENV="\n".join(entries))
    return text


def _parse_env(items: list[str]) -> dict[str, str]:
    out = {}
    for item in items:
        k, sep, v = item.partition("=")
        if not sep or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", k):
            raise SettingsError(f"--env {item!r}: KEY=VALUE")
        out[k] = v
    return out


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command: list[str] = []
    if "--" in argv:
        i = argv.index("--")
        argv, command = argv[:i], argv[i + 1:]
    p = argparse.ArgumentParser(prog="render_jobset.py", description=__doc__.split("\n\n")[0],
                                epilog="the command to run in every Pod comes after --")
    p.add_argument("--name", required=True, help="JobSet name (DNS-1035)")
    p.add_argument("--slices", type=int, default=1, help="TPU slices (child Jobs); set mesh.dcn_data to it")
    p.add_argument("--hosts-per-slice", type=int, required=True, help="TPU VMs (Pods) per slice")
    p.add_argument("--chips-per-host", type=int, default=4, help="TPU chips per VM (google.com/tpu), 4 on v5p/v6e")
    p.add_argument("--accelerator", required=True, help="node label gke-tpu-accelerator, e.g. tpu-v5p-slice")
    p.add_argument("--topology", required=True, help="node label gke-tpu-topology, e.g. 4x4x4")
    p.add_argument("--image", required=True, help="container image with alm_jax and jax[tpu] installed")
    p.add_argument("--max-restarts", type=int, default=3, help="JobSet restarts (each resumes: resume=auto)")
    p.add_argument("--grace-seconds", type=int, default=300, help="SIGTERM-to-SIGKILL time to checkpoint")
    p.add_argument("--env", action="append", default=[], metavar="KEY=VALUE", help="extra container variables")
    p.add_argument("-o", "--out", help="output file (default: stdout)")
    args = p.parse_args(argv)
    try:
        text = render(name=args.name, slices=args.slices, hosts_per_slice=args.hosts_per_slice,
                      accelerator=args.accelerator, topology=args.topology, image=args.image, command=command,
                      chips_per_host=args.chips_per_host, max_restarts=args.max_restarts,
                      grace_seconds=args.grace_seconds, env=_parse_env(args.env))
    except SettingsError as e:
        print(f"render_jobset.py: error: {e}", file=sys.stderr)
        return 2
    if args.out:
        Path(args.out).write_text(text)
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
