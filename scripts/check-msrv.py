#!/usr/bin/env python3
"""Fails when a package in Cargo.lock declares a `rust-version` newer than outbox-cdc's.

Only one toolchain is installed here, so `rust-version` in Cargo.toml cannot be checked by
building with that old a compiler. Two checks stand in for it (`make lint`): clippy's
`incompatible_msrv` lint (denied in Cargo.toml's [lints]) refuses standard library APIs newer
than `rust-version` in our code, and this script refuses dependencies that say they need a newer
compiler, from `cargo metadata` over the whole lock file (every platform, dev-dependencies too).
A dependency that declares no `rust-version` cannot be checked; they are counted.
"""

import json
import subprocess
import sys


def version(text):
    parts = [int(p) for p in text.split(".")]
    return tuple(parts + [0] * (3 - len(parts)))


def main():
    metadata = json.loads(
        subprocess.run(
            ["cargo", "metadata", "--format-version", "1", "--locked"],
            check=True,
            capture_output=True,
            text=True,
        ).stdout
    )
    members = set(metadata["workspace_members"])
    ours = [p for p in metadata["packages"] if p["id"] in members]
    failed = False
    for package in ours:
        if not package.get("rust_version"):
            print(f"{package['name']}: Cargo.toml declares no rust-version")
            failed = True
            continue
        msrv = version(package["rust_version"])
        newest, undeclared, newer = None, 0, []
        for dep in metadata["packages"]:
            if dep["id"] in members:
                continue
            declared = dep.get("rust_version")
            if not declared:
                undeclared += 1
                continue
            if newest is None or version(declared) > version(newest[0]):
                newest = (declared, f"{dep['name']} {dep['version']}")
            if version(declared) > msrv:
                newer.append(f"{dep['name']} {dep['version']} (rust-version {declared})")
        print(
            f"{package['name']}: rust-version {package['rust_version']}; the newest a dependency "
            f"declares is {newest[0]} ({newest[1]}); {undeclared} declare none"
        )
        for line in sorted(newer):
            print(f"  needs a newer Rust than {package['rust_version']}: {line}")
            failed = True
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
