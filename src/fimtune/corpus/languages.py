"""File name -> language, and how each language writes a line comment.

A file whose language is unknown is not code we want to learn from (LICENSE, data
files, lock files): the scanner counts it as `unknown_language` and skips it. A file
without a suffix that starts with a `#!` line is a script of the language it names.

    >>> language_of("src/app/main.py"), language_of("web/App.TSX"), language_of("Dockerfile")
    ('python', 'typescript', 'dockerfile')
    >>> language_of("notes/LICENSE") is None
    True
"""

from __future__ import annotations

import posixpath

NOTEBOOK_SUFFIX = ".ipynb"
UNKNOWN = "unknown"

EXTENSION_LANGUAGES: dict[str, str] = {
    # Python and notebooks
    ".py": "python",
    ".pyi": "python",
    ".pyx": "cython",
    ".pxd": "cython",
    ".pxi": "cython",
    NOTEBOOK_SUFFIX: "python",  # the kernel's language wins when the notebook names one
    # C family and systems
    ".c": "c",
    ".h": "c",
    ".cc": "cpp",
    ".cpp": "cpp",
    ".cxx": "cpp",
    ".hpp": "cpp",
    ".hh": "cpp",
    ".hxx": "cpp",
    ".ipp": "cpp",
    ".inl": "cpp",
    ".cu": "cuda",
    ".cuh": "cuda",
    ".m": "objective-c",
    ".mm": "objective-cpp",
    ".rs": "rust",
    ".go": "go",
    ".zig": "zig",
    ".swift": "swift",
    ".f": "fortran",
    ".for": "fortran",
    ".f90": "fortran",
    ".f95": "fortran",
    ".f03": "fortran",
    ".f08": "fortran",
    ".asm": "assembly",
    ".s": "assembly",
    ".sv": "systemverilog",
    ".svh": "systemverilog",
    ".vhd": "vhdl",
    ".vhdl": "vhdl",
    ".glsl": "glsl",
    ".vert": "glsl",
    ".frag": "glsl",
    # JVM and .NET
    ".java": "java",
    ".kt": "kotlin",
    ".kts": "kotlin",
    ".scala": "scala",
    ".groovy": "groovy",
    ".gradle": "groovy",
    ".clj": "clojure",
    ".cljs": "clojure",
    ".cljc": "clojure",
    ".cs": "csharp",
    ".fs": "fsharp",
    ".fsx": "fsharp",
    ".fsi": "fsharp",
    ".vb": "visual-basic",
    # Web
    ".js": "javascript",
    ".mjs": "javascript",
    ".cjs": "javascript",
    ".jsx": "javascript",
    ".ts": "typescript",
    ".mts": "typescript",
    ".tsx": "typescript",
    ".vue": "vue",
    ".svelte": "svelte",
    ".html": "html",
    ".htm": "html",
    ".css": "css",
    ".scss": "scss",
    ".sass": "sass",
    ".less": "less",
    ".php": "php",
    ".coffee": "coffeescript",
    ".elm": "elm",
    # Scripting
    ".rb": "ruby",
    ".pl": "perl",
    ".pm": "perl",
    ".lua": "lua",
    ".r": "r",
    ".jl": "julia",
    ".sh": "shell",
    ".bash": "shell",
    ".zsh": "shell",
    ".fish": "shell",
    ".ksh": "shell",
    ".ps1": "powershell",
    ".psm1": "powershell",
    ".bat": "batchfile",
    ".cmd": "batchfile",
    ".tcl": "tcl",
    ".awk": "awk",
    ".ex": "elixir",
    ".exs": "elixir",
    ".erl": "erlang",
    ".hrl": "erlang",
    ".hs": "haskell",
    ".ml": "ocaml",
    ".mli": "ocaml",
    ".dart": "dart",
    ".nim": "nim",
    ".lisp": "common-lisp",
    ".el": "emacs-lisp",
    ".rkt": "racket",
    ".pas": "pascal",
    ".adb": "ada",
    ".ads": "ada",
    ".sol": "solidity",
    # Data, config and build
    ".sql": "sql",
    ".proto": "protobuf",
    ".thrift": "thrift",
    ".graphql": "graphql",
    ".json": "json",
    ".jsonc": "json",
    ".yaml": "yaml",
    ".yml": "yaml",
    ".toml": "toml",
    ".ini": "ini",
    ".cfg": "ini",
    ".xml": "xml",
    ".cmake": "cmake",
    ".mk": "makefile",
    ".make": "makefile",
    ".tf": "hcl",
    ".hcl": "hcl",
    ".bzl": "starlark",
    ".dockerfile": "dockerfile",
    ".just": "just",
    # Prose that lives beside code
    ".md": "markdown",
    ".mdx": "markdown",
    ".rst": "restructuredtext",
    ".tex": "tex",
    ".txt": "text",
}

FILENAME_LANGUAGES: dict[str, str] = {
    "Makefile": "makefile",
    "makefile": "makefile",  # GNU make reads GNUmakefile, makefile and Makefile
    "GNUmakefile": "makefile",
    "Dockerfile": "dockerfile",
    "Containerfile": "dockerfile",  # podman's name for it
    "CMakeLists.txt": "cmake",
    "Jenkinsfile": "groovy",
    "Gemfile": "ruby",
    "Rakefile": "ruby",
    "Vagrantfile": "ruby",
    "justfile": "just",  # just reads justfile, Justfile and .justfile
    "Justfile": "just",
    ".justfile": "just",
    "BUILD": "starlark",
    "BUILD.bazel": "starlark",
    "WORKSPACE": "starlark",
}

DOCKERFILE_PREFIXES = ("Dockerfile.", "Containerfile.")
"""`Dockerfile.dev`, `Dockerfile.prod`: variants of one image's Dockerfile (`docker build -f`)."""
DOCKERIGNORE_SUFFIX = ".dockerignore"  # `Dockerfile.dockerignore` is the ignore file of that Dockerfile

# Interpreters a script without a suffix names on its `#!` line (`python3.11` is `python`)
SHEBANG_LANGUAGES: dict[str, str] = {
    "python": "python",
    "pypy": "python",
    "sh": "shell",
    "bash": "shell",
    "dash": "shell",
    "zsh": "shell",
    "ksh": "shell",
    "mksh": "shell",
    "fish": "shell",
    "node": "javascript",
    "nodejs": "javascript",
    "ts-node": "typescript",
    "ruby": "ruby",
    "perl": "perl",
    "php": "php",
    "lua": "lua",
    "Rscript": "r",
    "julia": "julia",
    "tclsh": "tcl",
    "awk": "awk",
    "gawk": "awk",
    "pwsh": "powershell",
    "make": "makefile",
    "groovy": "groovy",
    "elixir": "elixir",
    "escript": "erlang",
    "runghc": "haskell",
    "runhaskell": "haskell",
}
SHEBANG_MAX_BYTES = 256
"""How much of a file without a suffix is read to find its `#!` line."""

# the languages file names and suffixes give (`--languages` names others only for a Hub dataset's column)
KNOWN_LANGUAGES = frozenset(EXTENSION_LANGUAGES.values()) | frozenset(FILENAME_LANGUAGES.values())

LINE_COMMENTS: dict[str, str] = {
    "python": "#",
    "r": "#",
    "julia": "#",
    "ruby": "#",
    "perl": "#",
    "shell": "#",
    "scala": "//",
    "javascript": "//",
    "typescript": "//",
    "csharp": "//",
    "fsharp": "//",
    "cpp": "//",
    "c": "//",
    "rust": "//",
    "go": "//",
    "java": "//",
    "kotlin": "//",
    "swift": "//",
    "dart": "//",
    "groovy": "//",
    "php": "//",
    "objective-c": "//",
    "objective-cpp": "//",
    "cuda": "//",
    "zig": "//",
    "systemverilog": "//",
    "glsl": "//",
    "solidity": "//",
    "pascal": "//",
    "fortran": "!",
    "vhdl": "--",
    "ada": "--",
    "elm": "--",
    "common-lisp": ";",
    "emacs-lisp": ";",
    "racket": ";",
    "assembly": ";",
    "visual-basic": "'",
    "sql": "--",
    "haskell": "--",
    "lua": "--",
    "clojure": ";",
    "erlang": "%",
    "tex": "%",
    "matlab": "%",
    "octave": "%",
}
DEFAULT_LINE_COMMENT = "#"


# Language names datasets use (The Stack's `lang`, GitHub's linguist) that differ from the names
# above, which the file suffixes give
LANGUAGE_ALIASES = {
    "c++": "cpp",
    # xeus-cling notebooks' kernelspec language names the standard
    "c++11": "cpp",
    "c++14": "cpp",
    "c++17": "cpp",
    "c++20": "cpp",
    "c++23": "cpp",
    "c#": "csharp",
    "f#": "fsharp",
    "objective-c++": "objective-c",
    "bash": "shell",
    "sh": "shell",
    "zsh": "shell",
    "js": "javascript",
    "ts": "typescript",
    "py": "python",
    "golang": "go",
}


def canonical_language(name: str) -> str:
    """``name`` (a dataset's language column) as the suffixes name it.

    >>> canonical_language("C++"), canonical_language("C++17"), canonical_language("C#"), canonical_language("Python")
    ('cpp', 'cpp', 'csharp', 'python')
    """
    lowered = name.strip().lower()
    return LANGUAGE_ALIASES.get(lowered, lowered)


def content_language(language: str | None, text: str) -> str | None:
    """``language`` corrected by the text where a suffix is shared: a Qt translation file (`.ts`,
    XML) is no TypeScript.

    >>> content_language("typescript", '<?xml version="1.0"?>\\n<!DOCTYPE TS>'), content_language("typescript", "let x = 1")
    ('xml', 'typescript')
    """
    if language == "typescript" and text.lstrip().startswith("<?xml"):
        return "xml"
    return language


def language_of(path: str) -> str | None:
    """The language of a file from its name (case-insensitive suffix), or None when unknown.

    >>> language_of("a/b/CMakeLists.txt"), language_of("kernels/x.cu"), language_of("data.csv")
    ('cmake', 'cuda', None)
    >>> language_of("docker/Dockerfile.dev"), language_of("Justfile"), language_of("Dockerfile.dockerignore")
    ('dockerfile', 'just', None)
    """
    name = posixpath.basename(path)
    if name in FILENAME_LANGUAGES:
        return FILENAME_LANGUAGES[name]
    if not has_suffix(name):  # no suffix, or a dot-file such as `.bashrc`
        return None
    suffix = name[name.rfind(".") :].lower()
    if suffix not in EXTENSION_LANGUAGES and name.startswith(DOCKERFILE_PREFIXES) and suffix != DOCKERIGNORE_SUFFIX:
        return "dockerfile"
    return EXTENSION_LANGUAGES.get(suffix)


def has_suffix(name: str) -> bool:
    """Whether file name ``name`` has a suffix (a dot-file such as `.bashrc` has none).

    >>> has_suffix("main.py"), has_suffix("deploy"), has_suffix(".bashrc")
    (True, False, False)
    """
    return name.rfind(".") > 0


def script_language(head: str) -> str | None:
    """The language of the interpreter the `#!` line starting ``head`` names, or None: how a script
    without a suffix (`bin/deploy`) says what it is.

    >>> script_language("#!/usr/bin/env python3\\nimport sys\\n"), script_language("#!/bin/bash -eu\\n")
    ('python', 'shell')
    >>> script_language("#!/usr/bin/env -S node --no-warnings\\n"), script_language("MIT License\\n")
    ('javascript', None)
    """
    if not head.startswith("#!"):
        return None
    words = head[2:].split("\n", 1)[0].split()
    if words and posixpath.basename(words[0]) == "env":  # `env [-S] [NAME=value] python3`
        words = [w for w in words[1:] if not w.startswith("-") and "=" not in w]
    return SHEBANG_LANGUAGES.get(posixpath.basename(words[0]).rstrip("0123456789.")) if words else None


def line_comment(language: str) -> str:
    """The line-comment marker of ``language`` (`#` when not known).

    >>> line_comment("scala"), line_comment("python"), line_comment("brainfuck")
    ('//', '#', '#')
    """
    return LINE_COMMENTS.get(language, DEFAULT_LINE_COMMENT)
