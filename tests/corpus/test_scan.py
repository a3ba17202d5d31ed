"""Walking real folders: skipped folders, .gitignore, symlinks, odd files, sizes, counts."""

import os
import subprocess
from pathlib import Path

import pytest
from corpus_helpers import code, write

from fimtune.config import CorpusConfig
from fimtune.corpus.files import Tally
from fimtune.corpus.sources import Source, iter_documents


def scan_folder(root: Path, **fields) -> tuple[dict[str, str], Tally]:
    """{file_path: content} of the usable files under ``root``, and the tally."""
    source = Source("folder", str(root), root.name, str(root))
    docs = {d.file_path: d.content for d in iter_documents(source, CorpusConfig(**fields))}
    return docs, source.tally


def test_skipped_folders_are_counted_and_never_listed(tmp_path):
    for folder in (".git", "__pycache__", "node_modules", ".venv", "venv", "App.xcodeproj", "src/__pycache__"):
        write(tmp_path, f"{folder}/x.py", code("x"))
    write(tmp_path, "myenv/pyvenv.cfg", "home = /usr/bin\n")
    write(tmp_path, "myenv/lib/site.py", code("site"))
    write(tmp_path, "src/ok.py", code("ok"))
    docs, tally = scan_folder(tmp_path)
    assert list(docs) == ["src/ok.py"]
    assert tally.skipped_dirs == {"git": 1, "pycache": 2, "node_modules": 1, "virtualenv": 3, "xcodeproj": 1}
    assert tally.files_seen == 1  # files under skipped folders are never listed


def test_nested_gitignore_with_negation(tmp_path):
    write(tmp_path, ".gitignore", "*.gen.py\nbuild/\n/top_only.py\n")
    write(tmp_path, "a.gen.py", code("a"))
    write(tmp_path, "build/b.py", code("b"))
    write(tmp_path, "top_only.py", code("t"))
    write(tmp_path, "sub/top_only.py", code("t2"))
    write(tmp_path, "sub/.gitignore", "!keep.gen.py\nlocal.py\n")
    write(tmp_path, "sub/keep.gen.py", code("keep"))
    write(tmp_path, "sub/drop.gen.py", code("drop"))
    write(tmp_path, "sub/local.py", code("local"))
    write(tmp_path, "local.py", code("local_top"))  # sub/.gitignore does not reach up
    docs, tally = scan_folder(tmp_path)
    assert sorted(docs) == ["local.py", "sub/keep.gen.py", "sub/top_only.py"]
    assert tally.skipped_files["gitignore"] == 4  # a.gen.py, top_only.py, sub/drop.gen.py, sub/local.py
    assert tally.skipped_dirs["gitignore"] == 1  # build/
    docs, _ = scan_folder(tmp_path, respect_gitignore=False)
    assert "build/b.py" in docs and "a.gen.py" in docs


def test_invalid_gitignore_lines_are_skipped_like_git_does(tmp_path, caplog):
    """`bin\\` (a Windows habit), a lone `!` and `[z-a]` are no patterns: git skips those lines and
    keeps the rest of the file, and so does the scan, with one warning naming the file."""
    write(tmp_path, "vendor/.gitignore", "bin\\\n!\n*.tmp.py\n[z-a]\nobj/\n")
    write(tmp_path, "vendor/bin/tool.py", code("tool"))
    write(tmp_path, "vendor/lib.py", code("lib"))
    write(tmp_path, "vendor/scratch.tmp.py", code("scratch"))
    write(tmp_path, "vendor/obj/gen.py", code("gen"))
    with caplog.at_level("WARNING", logger="fimtune.corpus.files"):
        docs, tally = scan_folder(tmp_path)
    assert sorted(docs) == ["vendor/bin/tool.py", "vendor/lib.py"]
    assert tally.skipped_files["gitignore"] == 1 and tally.skipped_dirs["gitignore"] == 1
    [warning] = [r.getMessage() for r in caplog.records]
    assert str(tmp_path / "vendor" / ".gitignore") in warning
    assert "3 line(s)" in warning and "'bin\\\\', '!', '[z-a]'" in warning


def test_binary_undecodable_blocked_empty_unknown(tmp_path):
    write(tmp_path, "ok.py", code("ok"))
    write(tmp_path, "nul.py", b"x = 1\x00\x00")
    write(tmp_path, "latin1.py", b"name = 'caf\xe9'\n")
    write(tmp_path, "img.PNG", b"\x89PNG")
    write(tmp_path, "weights.safetensors", b"{}")
    write(tmp_path, "empty.py", "")
    write(tmp_path, "blank.py", "\n\n   \n")
    write(tmp_path, "LICENSE", "MIT License\n")
    docs, tally = scan_folder(tmp_path)
    assert list(docs) == ["ok.py"]
    assert tally.skipped_files == {
        "binary": 1,
        "undecodable": 1,
        "blocked_suffix": 2,
        "empty": 2,
        "unknown_language": 1,
    }
    assert tally.files_seen == 8 and tally.usable == 1


def test_a_script_without_a_suffix_is_of_the_language_its_shebang_names(tmp_path):
    """`bin/deploy` starting `#!/usr/bin/env python3` is Python (it was `unknown_language`); a suffix
    still decides (`tool.cgi`), a file without one nor a `#!` line is unknown, and a FIFO is not read."""
    write(tmp_path, "bin/deploy", "#!/usr/bin/env python3\n" + code("deploy"))
    write(tmp_path, "bin/setup", "#!/bin/bash -eu\necho 'installing the tool'\nmake install PREFIX=/usr/local\n")
    write(tmp_path, "bin/serve", "#!/usr/bin/env -S node --no-warnings\nconsole.log(require('os').hostname());\n")
    write(tmp_path, "bin/tool.cgi", "#!/usr/bin/perl\nprint 'content-type: text/plain';\n")
    write(tmp_path, "LICENSE", "MIT License\n")
    os.mkfifo(tmp_path / "bin/pipe")
    source = Source("folder", str(tmp_path), tmp_path.name, str(tmp_path))
    docs = {d.file_path: d.language for d in iter_documents(source, CorpusConfig())}
    assert docs == {"bin/deploy": "python", "bin/serve": "javascript", "bin/setup": "shell"}
    assert source.tally.skipped_files == {"unknown_language": 3}


def test_utf16_files_with_a_byte_order_mark_are_read(tmp_path):
    """PowerShell 5 and Visual Studio save UTF-16 with a byte order mark: text, not `binary`."""
    script = 'param([string]$Name)\nWrite-Host "Hello, $Name"\nGet-ChildItem -Path . | Sort-Object Length\n'
    program = "class Tool { static void Main() { System.Console.WriteLine(1); } }\n"
    write(tmp_path, "deploy.ps1", script.encode("utf-16"))  # the mark, then the machine's byte order
    write(tmp_path, "Tool.cs", b"\xfe\xff" + program.encode("utf-16-be"))
    write(tmp_path, "cut.py", b"\xff\xfe" + code("cut").encode("utf-16-le")[:-1])  # an odd length
    docs, tally = scan_folder(tmp_path)
    assert docs == {"Tool.cs": program, "deploy.ps1": script}
    assert tally.skipped_files == {"undecodable": 1}


def test_huge_file_is_never_read(tmp_path):
    write(tmp_path, "ok.py", code("ok"))
    with open(tmp_path / "huge.py", "wb") as f:
        f.truncate(50_000_000)  # sparse
    docs, tally = scan_folder(tmp_path)
    assert list(docs) == ["ok.py"] and tally.skipped_files["too_large"] == 1
    assert tally.bytes_read == len(code("ok").encode())  # only ok.py was read
    docs, _ = scan_folder(tmp_path, max_file_size=10)
    assert docs == {}


def test_secret_files_excluded_unless_kept(tmp_path):
    write(tmp_path, "ok.py", code("ok"))
    write(tmp_path, ".env", "API_KEY=abc\n")
    write(tmp_path, "deploy/key.pem", "-----BEGIN PRIVATE KEY-----\nMIIE\n")
    write(tmp_path, "settings.py", "AWS_KEY = 'AKIA" + "IOSFODNN7EXAMPLE'\nregion = 'eu-west-1'\n")
    docs, tally = scan_folder(tmp_path)
    assert list(docs) == ["ok.py"] and tally.skipped_files["secret"] == 3
    docs, _ = scan_folder(tmp_path, keep_secrets=True)
    assert "settings.py" in docs  # .env and .pem have no known language either way


def test_language_selection(tmp_path):
    write(tmp_path, "a.py", code("a"))
    write(tmp_path, "b.rs", 'fn main() {\n    println!("hello world from rust");\n}\n')
    docs, tally = scan_folder(tmp_path, languages=["Rust"])
    assert list(docs) == ["b.rs"] and tally.skipped_files["language_not_selected"] == 1


def test_symlinks(tmp_path):
    root = tmp_path / "root"
    write(root, "real/a.py", code("a"))
    write(tmp_path, "outside/b.py", code("b"))
    os.symlink(tmp_path / "outside", root / "linked_dir")  # not followed
    os.symlink(root, root / "real" / "loop_dir")  # a cycle, not followed
    os.symlink(tmp_path / "outside" / "b.py", root / "linked_file.py")  # followed
    os.symlink(root / "missing.py", root / "broken.py")
    os.symlink("self.py", root / "self.py")  # a symlink loop
    docs, tally = scan_folder(root)
    assert sorted(docs) == ["linked_file.py", "real/a.py"]
    assert tally.skipped_dirs == {"symlink_dir": 2}
    assert tally.skipped_files == {"broken_symlink": 1, "symlink_loop": 1}


def test_fifo_is_counted_as_unreadable_and_does_not_block(tmp_path):
    write(tmp_path, "ok.py", code("ok"))
    os.mkfifo(tmp_path / "pipe.py")
    docs, tally = scan_folder(tmp_path)
    assert list(docs) == ["ok.py"] and tally.skipped_files["unreadable"] == 1


def test_file_that_fails_to_read_is_counted(tmp_path):
    """A read error is counted, not fatal. As root, chmod 000 still reads, so the failing file
    is /proc/self/mem (a regular file whose read at offset 0 fails with EIO)."""
    write(tmp_path, "ok.py", code("ok"))
    if os.geteuid() != 0:
        write(tmp_path, "secret_perms.py", code("p")).chmod(0)
    elif os.path.exists("/proc/self/mem"):
        os.symlink("/proc/self/mem", tmp_path / "mem.py")
    else:
        pytest.skip("running as root without /proc: no way to make a file unreadable")
    docs, tally = scan_folder(tmp_path)
    assert list(docs) == ["ok.py"] and tally.skipped_files["unreadable"] == 1


def test_walk_order_is_sorted_path_order(tmp_path):
    for name in ("b.py", "a/z.py", "a/b.py", "C.py"):
        write(tmp_path, name, code(name.replace("/", "_").replace(".", "_")))
    docs, _ = scan_folder(tmp_path)
    assert list(docs) == ["C.py", "a/b.py", "a/z.py", "b.py"]


def test_non_utf8_file_name_becomes_a_valid_path(tmp_path):
    write(tmp_path, "ok.py", code("ok"))
    with open(os.path.join(os.fsencode(tmp_path), b"caf\xe9.py"), "w") as f:
        f.write(code("cafe"))
    docs, _ = scan_folder(tmp_path)
    assert sorted(docs) == ["caf\ufffd.py", "ok.py"]


def test_nested_repos_get_their_own_repo_id(tmp_path):
    write(tmp_path, ".gitignore", "*.tmp.py\n")
    write(tmp_path, "top.py", code("top"))
    write(tmp_path, "projects/alpha/.git/HEAD", "ref: refs/heads/main\n")
    write(tmp_path, "projects/alpha/src/a.py", code("a"))
    write(tmp_path, "projects/alpha/kept.tmp.py", code("kept"))  # the outer .gitignore stops at a repo
    source = Source("folder", str(tmp_path), "home", str(tmp_path))
    docs = [(d.repo_id, d.file_path) for d in iter_documents(source, CorpusConfig())]
    assert docs == [("alpha", "kept.tmp.py"), ("alpha", "src/a.py"), ("home", "top.py")]


def test_saved_dataset_folders_are_skipped(tmp_path):
    write(tmp_path, "a.py", code("a"))
    write(tmp_path, "data/mine/dataset_dict.json", '{"splits": ["train", "validation"]}')
    write(tmp_path, "data/mine/train/state.json", '{"_data_files": [{"filename": "data-00000-of-00001.arrow"}]}')
    docs, tally = scan_folder(tmp_path)
    assert list(docs) == ["a.py"] and tally.skipped_dirs == {"saved_dataset": 1}


def test_a_subfolder_of_a_repository_keeps_the_gitignores_above_it(tmp_path):
    """git applies a repository's .gitignore files to its subfolders: building one subfolder of a
    monorepo leaves out what they ignore there, as `git check-ignore` does."""
    write(tmp_path, "mono/.git/HEAD", "ref: refs/heads/main\n")
    ignores = {"": "generated/\nsecrets_local.py\n/top.py\n", "pkg/": "*.tmp.py\n", "pkg/core/sub/": "!keep.tmp.py\n"}
    for folder, rules in ignores.items():
        write(tmp_path, f"mono/{folder}.gitignore", rules)
    # pkg/top.py: mono/.gitignore's /top.py is anchored at mono/, not this one
    for name in ("core/c", "core/d.tmp", "core/sub/keep.tmp", "generated/api", "secrets_local", "top"):
        write(tmp_path, f"mono/pkg/{name}.py", code(name.replace("/", "_").replace(".", "_")))
    docs, tally = scan_folder(tmp_path / "mono" / "pkg" / "core")
    assert sorted(docs) == ["c.py", "sub/keep.tmp.py"] and tally.skipped_files["gitignore"] == 1
    docs, tally = scan_folder(tmp_path / "mono" / "pkg")
    assert sorted(docs) == ["core/c.py", "core/sub/keep.tmp.py", "top.py"]
    assert tally.skipped_dirs["gitignore"] == 1 and tally.skipped_files["gitignore"] == 2
    # a folder the repository ignores, asked for by name (a project's .venv/.../site-packages, say)
    docs, tally = scan_folder(tmp_path / "mono" / "pkg" / "generated")
    assert list(docs) == ["api.py"] and not tally.skipped_files


def test_a_link_through_a_file_is_a_broken_link(tmp_path):
    write(tmp_path, "ok.py", code("ok"))
    os.symlink("ok.py/nothing", tmp_path / "link.py")
    docs, tally = scan_folder(tmp_path)
    assert list(docs) == ["ok.py"] and tally.skipped_files == {"broken_symlink": 1}


def test_a_byte_order_mark_is_no_content(tmp_path):
    """A file with a UTF-8 byte order mark reads as its copy without one: the same text, so exact
    dedup finds them (with the mark kept, the two landed on both sides of the split)."""
    write(tmp_path, "a.py", code("scale"))
    write(tmp_path, "b.py", b"\xef\xbb\xbf" + code("scale").encode())
    docs, _ = scan_folder(tmp_path)
    assert docs["a.py"] == docs["b.py"] == code("scale")


def test_a_repositorys_info_exclude_applies_like_its_gitignore(tmp_path):
    """`.git/info/exclude` holds a clone's own ignore rules (scratch files, local notes): git leaves
    out what it matches, as a .gitignore's match, and a .gitignore may take a file back."""
    repo = tmp_path / "repo"
    subprocess.run(["git", "init", "-q", str(repo)], check=True)
    write(repo, ".git/info/exclude", "scratch_*.py\nnotes/\n")
    write(repo, "pkg/.gitignore", "!scratch_keep.py\n")
    for name in ("a", "scratch_b", "notes/c", "pkg/scratch_keep", "pkg/d", "sub/scratch_e", "sub/f"):
        write(repo, f"{name}.py", code(name.replace("/", "_")))
    listed = subprocess.run(
        ["git", "ls-files", "--others", "--exclude-standard", "*.py"], cwd=repo, capture_output=True, text=True
    )
    docs, tally = scan_folder(repo)
    assert sorted(docs) == sorted(listed.stdout.split()) == ["a.py", "pkg/d.py", "pkg/scratch_keep.py", "sub/f.py"]
    assert tally.skipped_files["gitignore"] == 2 and tally.skipped_dirs["gitignore"] == 1
    docs, _ = scan_folder(repo / "sub")  # a subfolder of the repository: its rules apply there too
    assert list(docs) == ["f.py"]


def test_gitignore_rules_on_folders_and_on_files_in_them_agree_with_git(tmp_path):
    """A whitelist `.gitignore` (`*`, then `!*/` and `!*.py`) keeps the .py files of every folder,
    and a rule that takes a folder back (`!sub`) does not take back its files another rule ignores:
    git decides a path by the last rule that matches the path itself, as `git ls-files` shows."""
    repo = tmp_path / "repo"
    subprocess.run(["git", "init", "-q", str(repo)], check=True)
    write(repo, "white/.gitignore", "*\n!*/\n!*.py\nbuild/\n")
    write(repo, "back/.gitignore", "*.gen.py\nsub\n!sub\n")
    for name in ("white/a", "white/pkg/b", "white/pkg/deep/c", "back/sub/d", "back/sub/e.gen", "back/f.gen"):
        write(repo, f"{name}.py", code(name.replace("/", "_").replace(".", "_")))
    write(repo, "white/pkg/notes.md", "# notes\n\nsome text here\n")
    write(repo, "white/build/notes.md", "# build notes\n\nsome text here\n")
    listed = subprocess.run(
        ["git", "ls-files", "--others", "--exclude-standard"], cwd=repo, capture_output=True, text=True
    )
    expected = ["back/.gitignore", "back/sub/d.py", "white/a.py", "white/pkg/b.py", "white/pkg/deep/c.py"]
    assert sorted(listed.stdout.split()) == expected
    docs, tally = scan_folder(repo)
    assert sorted(docs) == [p for p in expected if not p.endswith(".gitignore")]
    assert tally.skipped_files["gitignore"] == 4  # white/.gitignore, notes.md, sub/e.gen.py, f.gen.py
    assert tally.skipped_dirs["gitignore"] == 1  # white/build/
    docs, _ = scan_folder(repo / "white" / "build")  # an ignored folder asked for by name: all its files
    assert list(docs) == ["notes.md"]


def test_files_git_tracks_are_kept_whatever_the_gitignore_says(tmp_path):
    """A file committed before the rule that matches it (or force-added) is tracked, and git keeps
    it: the folder gives the files its clone gives, and only untracked files are left out."""
    from corpus_helpers import GIT_ENV

    repo = tmp_path / "repo"
    git = {"cwd": repo, "check": True, "env": {**os.environ, **GIT_ENV}}
    subprocess.run(["git", "init", "-q", str(repo)], check=True)
    for name in ("a", "old", "build/keep"):
        write(repo, f"{name}.py", code(name.replace("/", "_")))
    subprocess.run(["git", "add", "."], **git)
    write(repo, ".gitignore", "old.py\nnew.py\nbuild/\n")
    subprocess.run(["git", "add", ".gitignore"], **git)
    subprocess.run(["git", "commit", "-qm", "x"], **git)
    write(repo, "new.py", code("new"))  # untracked and ignored
    write(repo, "build/out.py", code("out"))  # untracked, in an ignored folder
    docs, tally = scan_folder(repo)
    assert sorted(docs) == ["a.py", "build/keep.py", "old.py"]
    assert tally.skipped_files["gitignore"] == 2  # new.py, build/out.py
    write(repo, "sub/.gitignore", "*.py\n")
    write(repo, "sub/kept.py", code("kept"))
    subprocess.run(["git", "add", "-f", "sub/kept.py"], **git)
    write(repo, "sub/left.py", code("left"))
    docs, _ = scan_folder(repo / "sub")  # a subfolder: git lists its tracked files from there
    assert list(docs) == ["kept.py"]


def test_fimtune_run_and_merged_folders_are_skipped(tmp_path):
    """A user who follows the README inside their project gets runs/ and merged/ there: a later
    `data build .` took the run's config, checkpoint states, adapter card and eval report, and the
    merged model's configs, as their code."""
    write(tmp_path, "a.py", code("a"))
    write(tmp_path, "runs/mine/config.yaml", "output_dir: runs/mine\n")
    write(tmp_path, "runs/mine/tokenizer/tokenizer_config.json", '{"model_max_length": 8192}\n')
    write(tmp_path, "runs/mine/checkpoints/step-000002/state/trainer_state.json", '{"step": 2}\n')
    write(tmp_path, "runs/mine/eval/report.md", "# report\n\nloss went down\n")
    write(tmp_path, "merged/mine/config.json", '{"model_type": "llama"}\n')
    write(tmp_path, "merged/mine/fimtune.json", '{"prompt_mode": "spm"}\n')
    write(tmp_path, "settings/config.yaml", "name: kept\n")  # a project's own config is code
    docs, tally = scan_folder(tmp_path)
    assert list(docs) == ["a.py", "settings/config.yaml"] and tally.skipped_dirs == {"fimtune_output": 2}
