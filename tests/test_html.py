"""The verdict page (`--html`): it parses, names every layer, marks exactly the failing rows of
a planted fault, references nothing outside itself, escapes hostile keys, and gives a batch one
section per item."""

from __future__ import annotations

from dataclasses import dataclass, field
from html.parser import HTMLParser

import torch
from safetensors.torch import save_file

import convert
from tests import test_verify
from tests.conftest import FIXTURES

MODELS = FIXTURES / "models.py"
VOID = {"meta", "br", "img", "link", "input", "hr", "col", "area", "base", "wbr", "source"}
SVG_VOID = {"line", "rect", "circle", "path"}  # written self-closing in the page


@dataclass
class Node:
    tag: str
    attrs: dict[str, str]
    children: list[Node] = field(default_factory=list)
    text: str = ""

    def iter(self, tag: str | None = None):
        if tag is None or self.tag == tag:
            yield self
        for c in self.children:
            yield from c.iter(tag)

    def all_text(self) -> str:
        return self.text + "".join(c.all_text() for c in self.children)

    @property
    def classes(self) -> set[str]:
        return set(self.attrs.get("class", "").split())


class TreeBuilder(HTMLParser):
    """A tree of the page; a close tag that does not match its open tag fails the test."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.root = Node("#root", {})
        self.stack = [self.root]

    def handle_starttag(self, tag, attrs):
        node = Node(tag, {k: v or "" for k, v in attrs})
        self.stack[-1].children.append(node)
        if tag not in VOID:
            self.stack.append(node)

    def handle_startendtag(self, tag, attrs):
        self.stack[-1].children.append(Node(tag, {k: v or "" for k, v in attrs}))

    def handle_endtag(self, tag):
        if tag in VOID:
            return
        assert self.stack[-1].tag == tag, f"</{tag}> closes <{self.stack[-1].tag}>"
        self.stack.pop()

    def handle_data(self, data):
        self.stack[-1].children.append(Node("#text", {}, text=data))


def parse(path) -> Node:
    text = path.read_text(encoding="utf-8")
    builder = TreeBuilder()
    builder.feed(text)
    builder.close()
    assert [n.tag for n in builder.stack] == ["#root"], "unclosed elements"
    return builder.root


def assert_self_contained(path) -> None:
    """No script, no element that loads anything, no attribute or style that leaves the page
    (text may mention an address: a hostile key is text, escaped)."""
    root = parse(path)
    for tag in ("script", "link", "img", "iframe", "object", "embed", "image", "use"):
        assert not list(root.iter(tag)), f"<{tag}> in the page"
    for node in root.iter():
        for name, value in node.attrs.items():
            if name in ("src", "href", "action", "xlink:href", "srcset", "data"):
                assert value.startswith("#"), f"<{node.tag} {name}={value!r}> leaves the page"
            assert "//" not in value and "url(" not in value, f"<{node.tag} {name}={value!r}>"
            assert not name.startswith("on"), f"<{node.tag} {name}> is a script"
    styles = "".join(s.all_text() for s in root.iter("style"))
    assert styles and "@import" not in styles and "url(" not in styles and "//" not in styles


def rows(root: Node, table_class: str) -> list[Node]:
    table = next(t for t in root.iter("table") if table_class in t.classes)
    return [tr for tr in table.iter("tr") if not list(tr.iter("th"))]


def cell_texts(tr: Node) -> list[str]:
    return [td.all_text().strip() for td in tr.iter("td")]


mlp_pair = test_verify.mlp_pair  # SRC and its verified conversion


def test_page_of_a_planted_fault_marks_exactly_its_row(mlp_pair, runner, tmp_path):
    src, dst = mlp_pair
    test_verify._tamper(dst, lambda t: t["fc2.weight"][0, 0].add_(0.01))
    page = tmp_path / "verdict.html"
    res = runner("verify", src, dst, "--html", page)
    assert res.exit_code == 1 and page.exists()  # written even though (because) it failed
    assert_self_contained(page)
    root = parse(page)
    body = next(root.iter("body"))
    first = next(n for n in body.children if n.tag != "#text")
    assert "verdict" in first.classes and "fail" in first.classes
    assert "NOT equivalent" in first.all_text() and "fc2.weight" in first.all_text()
    checks = rows(root, "checks")
    names = [cell_texts(tr)[2] for tr in checks]  # the name (no source shown: the same)
    assert sorted(names) == ["fc1.bias", "fc1.weight", "fc2.bias", "fc2.weight"]
    failing = [cell_texts(tr)[2] for tr in checks if "fail" in tr.classes]
    assert failing == ["fc2.weight"]
    assert all("FAIL" in cell_texts(tr)[0] for tr in checks if "fail" in tr.classes)
    fc2 = next(tr for tr in checks if cell_texts(tr)[2] == "fc2.weight")
    assert "sqrt" not in cell_texts(fc2)[7] and "√6" in cell_texts(fc2)[7]  # its tolerance
    assert cell_texts(fc2)[8] == "0.00672"  # the smallest atol that would pass
    svg = next(root.iter("svg"))
    bars = [g for g in svg.iter("g")]
    assert [g.all_text().split(":")[0] for g in bars if "fail" in g.classes] == ["fc2.weight"]
    assert {"fc1.weight", "fc2.weight"} <= {g.all_text().split(":")[0] for g in bars}
    assert "linconvert verify" in next(n for n in root.iter("pre")).all_text()


def test_conversion_page_has_the_plan_and_is_written_when_verification_fails(
        fixture_dir, runner, monkeypatch, tmp_path):
    import convert.execute as ex

    real = ex.transpose_bytes

    def flip_a_bit(*args):  # a planted executor bug: one bit of each transposed tensor
        out = real(*args)
        out[len(out) // 2] ^= 0x40
        return out

    monkeypatch.setattr(ex, "transpose_bytes", flip_a_bit)
    page, dst = tmp_path / "p.html", fixture_dir / "o.safetensors"
    res = runner("to-linear", fixture_dir / "square_nobias.safetensors", "-o", dst,
                 "--layers", "proj.weight", "--exclude", "out.weight", "--html", page)
    assert res.exit_code == 1 and not dst.exists() and page.exists()
    root = parse(page)
    assert_self_contained(page)
    failing = [cell_texts(tr)[2] for tr in rows(root, "checks") if "fail" in tr.classes]
    assert failing == ["proj.weight"]
    plan = {cell_texts(tr)[0]: cell_texts(tr) for tr in rows(root, "plan")}
    assert set(plan) == {"proj.weight", "out.weight"}
    assert plan["proj.weight"][2] == "transpose" and plan["out.weight"][2] == "keep"
    assert plan["proj.weight"][3] == "4x4 → 4x4" and "selected by" in plan["proj.weight"][5]
    assert "was not written" in next(root.iter("body")).all_text()


def test_dry_run_and_api_pages(mlp_pair, tmp_path):
    src, dst = mlp_pair
    convert.to_param(dst, tmp_path / "back.safetensors", dry_run=True, html=tmp_path / "d.html")
    root = parse(tmp_path / "d.html")
    assert "dry run" in root.all_text() and len(rows(root, "plan")) == 4
    assert not (tmp_path / "back.safetensors").exists()
    report = convert.verify(src, dst, html=tmp_path / "v.html")
    assert report.equivalent
    root = parse(tmp_path / "v.html")
    verdict = next(n for n in root.iter("div") if "verdict" in n.classes)
    assert "pass" in verdict.classes and "equivalent" in verdict.all_text()
    assert next(root.iter("pre")).all_text().startswith("convert.verify(")
    assert "DST provenance: source SHA-256" in root.all_text()  # DST was written by linconvert


def test_hostile_keys_are_escaped(fixture_dir, runner, tmp_path):
    evil = '<script>alert("x")</script><img src=http://evil.example/x>'
    src = fixture_dir / "evil.safetensors"
    save_file({f"{evil}.weight": torch.randn(3, 5), f"{evil}.bias": torch.randn(5)}, str(src))
    page = tmp_path / "e.html"
    res = runner("to-linear", src, "-o", fixture_dir / "evil.linear.safetensors", "--html", page)
    assert res.exit_code == 0, res.stdout + res.stderr
    text = page.read_text()
    assert "<script>" not in text and "<img" not in text
    assert "&lt;script&gt;" in text
    assert_self_contained(page)
    assert evil + ".weight" in [cell_texts(tr)[0] for tr in rows(parse(page), "plan")]


def test_whole_model_figures_on_the_page(mlp_pair, runner, tmp_path):
    src, dst = mlp_pair
    page = tmp_path / "w.html"
    res = runner("verify", src, dst, "--source-model", f"{MODELS}:build_param_mlp",
                 "--target-model", f"{MODELS}:build_linear_mlp", "--input-shape", "16,4",
                 "--logits", "0", "--reference", "float64", "--min-top1", "1", "--html", page)
    assert res.exit_code == 0, res.stdout + res.stderr
    root = parse(page)
    figures = rows(root, "figures")
    out = next(cell_texts(tr) for tr in figures if cell_texts(tr)[0] == "output[0]")
    assert out[1] == "1.000000" and out[2] == "1" and out[-1] == "min_top1"
    assert len(out) == 9  # with the two sides' distances from the float64 run
    assert "gates" in root.all_text() and "--min-top1 1" in root.all_text()


def test_batch_page_has_one_section_per_item(fixture_dir, tmp_path, runner):
    for name in ("a", "b"):
        (fixture_dir / "in").mkdir(exist_ok=True)
        save_file({"l.weight": torch.randn(3, 5), "l.bias": torch.randn(5)},
                  str(fixture_dir / "in" / f"{name}.safetensors"))
    (fixture_dir / "in" / "c.safetensors").write_bytes(b"not a checkpoint at all")
    page = tmp_path / "b.html"
    res = runner("batch", fixture_dir / "in", "--direction", "to-linear", "--out-dir",
                 tmp_path / "out", "-j", "2", "--html", page)  # sections cross processes
    assert res.exit_code == 4 and page.exists()
    root = parse(page)
    assert_self_contained(page)
    items = rows(root, "items")
    assert len(items) == 3
    links = [a.attrs["href"] for tr in items for a in tr.iter("a")]
    sections = [s for s in root.iter("section") if "item" in s.classes]
    assert links == [f"#{s.attrs['id']}" for s in sections] and len(sections) == 3
    assert [("fail" in tr.classes) for tr in items] == [False, False, True]
    assert all(len(rows(s, "plan")) == 2 for s in sections[:2])
    assert "c.safetensors" in sections[2].all_text() and not list(sections[2].iter("table"))
