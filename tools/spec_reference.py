"""Regenerate docs/spec-reference.md from the spec schema: python tools/spec_reference.py"""

from pathlib import Path

from rtlib.spec.reference import spec_reference_markdown

TARGET = Path(__file__).resolve().parent.parent / "docs" / "spec-reference.md"

if __name__ == "__main__":
    TARGET.write_text(spec_reference_markdown())
    print(f"wrote {TARGET}")
