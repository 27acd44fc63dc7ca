"""`imageswarm agent`: verify and swap a root in place, without the daemon.

Every command takes --root (default /) and --state-dir (default /var/lib/imageswarm/agent).
An image is named either as a local file (--image FILE [--sha256 HEX]) or as an image in the
node's chunk store (--image-id ID, with --store DIR and --trusted-key, or --config NODE.yaml).
"""

from __future__ import annotations

import argparse
import json
import shlex
from pathlib import Path
from typing import Any

from imageswarm.agent import preserve
from imageswarm.agent.apply import Agent, Options
from imageswarm.agent.errors import InvalidInputError
from imageswarm.agent.health import HealthCheck
from imageswarm.agent.journal import ImageRef, StateDir
from imageswarm.agent.keys import PublicKey
from imageswarm.agent.source import import_file, import_store
from imageswarm.daemon import config as cfgmod

DEFAULT_STATE = Path("/var/lib/imageswarm/agent")


def register(groups: Any) -> None:
    parser = groups.add_parser("agent", help="apply images to a root in place (no daemon needed)")
    sub = parser.add_subparsers(dest="action", required=True, metavar="ACTION")
    for name, func, helptext, image in (
        ("apply", cmd_apply, "verify an image and swap the root to it", True),
        ("plan", cmd_plan, "print what applying an image would change", True),
        ("adopt", cmd_adopt, "record the image the root runs now (enables rollback)", True),
        ("rollback", cmd_rollback, "restore the previous image", False),
        ("recover", cmd_recover, "finish or roll back an interrupted operation", False),
        ("verify", cmd_verify, "compare the live root with its image (exit 1: drifted)", False),
        ("status", cmd_status, "current/previous image, last operation, pending work", False),
        ("reboot", cmd_reboot, "the explicit go after a `hold` apply: reboot now", False),
    ):
        p = sub.add_parser(name, help=helptext)
        _common(p)
        if image:
            _image_args(p)
        if name == "apply":
            p.add_argument("--dry-run", action="store_true", help="plan only, change nothing")
        if name == "adopt":
            p.add_argument("--force", action="store_true", help="replace a recorded image")
        p.add_argument("--json", action="store_true")
        p.set_defaults(func=func)


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--root", type=Path, default=Path("/"), help="root to swap (default /)")
    p.add_argument("--state-dir", type=Path, default=DEFAULT_STATE)
    p.add_argument("--hooks", type=Path, help="dir with pre-configure.d, configure.d, ...")
    p.add_argument("--hook-timeout", type=float, default=300.0)
    p.add_argument(
        "--preserve",
        action="append",
        default=[],
        metavar="PATH",
        help="also keep this root-relative path (a trailing / means a tree)",
    )
    p.add_argument(
        "--no-default-preserve",
        action="store_true",
        help="keep only the --preserve paths (runtime trees are still kept)",
    )
    p.add_argument(
        "--policy",
        choices=["auto", "never", "always", "hold"],
        default="auto",
        help="reboot policy when the kernel changes (default auto)",
    )
    p.add_argument("--health-cmd", help="command that must exit 0 after configure")
    p.add_argument("--health-url", help="URL that must answer 2xx after configure")
    p.add_argument("--reboot-command", default="systemctl reboot")
    p.add_argument(
        "--restart-services",
        action="store_true",
        help="restart the systemd units still running replaced files",
    )
    p.add_argument(
        "--allow-no-rollback",
        action="store_true",
        help="apply even when no previous image is known",
    )


def _image_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--image", type=Path, help="a local image file (raw, qcow2 or tar)")
    p.add_argument("--sha256", help="expected SHA-256 of --image")
    p.add_argument("--image-id", help="an image in the node's chunk store")
    p.add_argument("--store", type=Path, help="chunk store dir (default: from --config)")
    p.add_argument("--trusted-key", action="append", default=[], help="ed25519:... public key")
    p.add_argument("--config", type=Path, help="node config: store and trusted keys")


def options(args: argparse.Namespace) -> Options:
    keep = tuple(args.preserve) + (
        preserve.RUNTIME if args.no_default_preserve else preserve.DEFAULTS
    )
    if args.health_cmd and args.health_url:
        raise InvalidInputError("give --health-cmd or --health-url, not both")
    check = None
    if args.health_cmd:
        check = HealthCheck(command=tuple(shlex.split(args.health_cmd)))
    elif args.health_url:
        check = HealthCheck(url=args.health_url)
    return Options(
        root=args.root,
        state_dir=args.state_dir,
        hooks=args.hooks,
        hook_timeout=args.hook_timeout,
        preserve=keep,
        policy=args.policy,
        health=check,
        reboot_command=tuple(shlex.split(args.reboot_command)),
        restart_services=args.restart_services,
        allow_no_rollback=args.allow_no_rollback,
    )


def image_ref(args: argparse.Namespace) -> ImageRef:
    state = StateDir(args.state_dir)
    if (args.image is None) == (args.image_id is None):
        raise InvalidInputError("name the image with exactly one of --image FILE or --image-id ID")
    if args.image is not None:
        return import_file(state, args.image, args.sha256)
    store, keys = args.store, [PublicKey.parse(k) for k in args.trusted_key]
    if args.config is not None:
        cfg = cfgmod.load(args.config)
        store = store or cfg.store_dir
        keys += list(cfg.trusted_keys)
    if store is None or not keys:
        raise InvalidInputError("--image-id needs --store and --trusted-key, or --config")
    return import_store(state, store, args.image_id, keys)


def _print(data: Any, as_json: bool, text: str) -> None:
    print(json.dumps(data, indent=1, default=str) if as_json else text)


def _op_text(op: dict[str, Any]) -> str:
    lines = [f"{op['kind']} {op['image']['image_id']}: {op['result']}"]
    if op.get("error"):
        lines.append(f"  error: {op['error']}")
    for p in op["phases"]:
        lines.append(f"  {p['name']:<15} {p['seconds']:>8.2f}s {'ok' if p['ok'] else 'FAILED'}")
    if op.get("plan"):
        plan = op["plan"]
        lines.append(
            f"  files: {plan['added']} added, {plan['changed']} changed, "
            f"{plan['removed']} removed, {plan['attributes']} attributes; {plan['bytes']} bytes"
        )
    if op.get("reboot"):
        lines.append(f"  reboot: {op['reboot']['summary']}")
    for s in op.get("services", []):
        what = "restarted" if s.get("restarted") else "still running replaced files"
        lines.append(f"  {what}: {s['unit'] or '-'} (pid {s['pid']} {s['comm']})")
    return "\n".join(lines)


def cmd_apply(args: argparse.Namespace) -> int:
    agent = Agent(options(args))
    ref = image_ref(args)
    if args.dry_run:
        plan = agent.plan(ref)
        _print(plan.to_json(), args.json, f"dry run, nothing changed: {plan.summary()}")
        return 0
    op = agent.apply(ref).to_json()
    _print(op, args.json, _op_text(op))
    return 0


def cmd_plan(args: argparse.Namespace) -> int:
    plan = Agent(options(args)).plan(image_ref(args))
    _print(plan.to_json(), args.json, plan.summary() + "\n" + plan.change_list())
    return 0


def cmd_adopt(args: argparse.Namespace) -> int:
    agent = Agent(options(args))
    current = agent.state.current()
    ref = image_ref(args)
    if current is not None and current.image_id != ref.image_id and not args.force:
        raise InvalidInputError(f"{args.root} already runs {current.image_id}; use --force")
    drift = agent.plan(ref)
    agent.adopt(ref)
    _print(
        {"image_id": ref.image_id, "drift": drift.to_json()},
        args.json,
        f"{args.root} now recorded as running {ref.image_id} (differences: {drift.summary()})",
    )
    return 0


def cmd_rollback(args: argparse.Namespace) -> int:
    op = Agent(options(args)).rollback().to_json()
    _print(op, args.json, _op_text(op))
    return 0


def cmd_recover(args: argparse.Namespace) -> int:
    op = Agent(options(args)).recover()
    if op is None:
        _print(None, args.json, "nothing to recover")
        return 0
    data = op.to_json()
    _print(data, args.json, _op_text(data))
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    agent = Agent(options(args))
    current = agent.state.current()
    if current is None:
        raise InvalidInputError(f"no image is recorded for {args.root}; nothing to compare")
    plan = agent.plan(current)
    clean = plan.files_touched == 0
    _print(
        {"image_id": current.image_id, "clean": clean, **plan.to_json()},
        args.json,
        f"{args.root} matches {current.image_id}"
        if clean
        else f"{args.root} drifted from {current.image_id}: {plan.summary()}\n{plan.change_list()}",
    )
    return 0 if clean else 1


def cmd_status(args: argparse.Namespace) -> int:
    status = StateDir(args.state_dir).report()
    pending = status["pending"]
    text = [
        f"current:  {(status.get('current') or {}).get('image_id', '-')}",
        f"previous: {(status.get('previous') or {}).get('image_id', '-')}",
    ]
    if status.get("reboot_held"):
        text.append("reboot held: run `imageswarm agent reboot` to reboot into the new kernel")
    if pending:
        phase = pending["phases"][-1]["name"] if pending["phases"] else "-"
        text.append(f"PENDING: {pending['kind']} of {pending['image']['image_id']} at {phase}")
    if status.get("last"):
        text.append("last: " + _op_text(status["last"]))
    _print(status, args.json, "\n".join(text))
    return 0


def cmd_reboot(args: argparse.Namespace) -> int:
    if not Agent(options(args)).release_hold():
        raise InvalidInputError("no reboot is held")
    return 0
