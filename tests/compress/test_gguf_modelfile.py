"""Ollama Modelfile: the Go template built from the HF chat template renders what apply_chat_template renders."""

from __future__ import annotations

import copy
import json
import shutil
import subprocess

import pytest
from test_gguf import CHATML, spm_tokenizer

from posttrain.compress.modelfile import GENERIC_TEMPLATE, go_template, infer_pieces, write_modelfile

LLAMA3_STYLE = ("{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
                "{{ m['content'] }}<|eot_id|>{% endfor %}"
                "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}")
# Llama-2 style: the system prompt goes inside the first user turn, which role-wrapped pieces cannot express.
SYSTEM_IN_USER = ("{% for m in messages %}{% if m['role'] == 'user' %}[INST] {% if loop.index0 == 1 %}<<SYS>>\n"
                  "{{ messages[0]['content'] }}\n<</SYS>>\n\n{% endif %}{{ m['content'] }} [/INST]"
                  "{% elif m['role'] == 'assistant' %} {{ m['content'] }} </s>{% endif %}{% endfor %}")
REWRITES_CONTENT = "{% for m in messages %}{{ m['content'] | upper }}{% endfor %}"
CONVERSATIONS = [  # contents with spaces and newlines, which the Go template must pass through untouched
    [{"role": "user", "content": "What is 2 + 2?"}],
    [{"role": "system", "content": "Be brief.\n"}, {"role": "user", "content": " hi "}],
    [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b\n\nc"}, {"role": "user", "content": "d"}],
    [{"role": "system", "content": "S"}, {"role": "user", "content": "u"}, {"role": "assistant", "content": "x"},
     {"role": "user", "content": "y"}],
]


@pytest.fixture
def tok(tiny_tokenizer):
    return copy.deepcopy(tiny_tokenizer)  # the tests below change its chat template


def test_posttrain_modelfile(tok, tmp_path):
    path = write_modelfile(tmp_path / "model-Q8_0.gguf", tok)
    assert path == tmp_path / "model-Q8_0.Modelfile"
    assert path.read_text() == (
        "FROM ./model-Q8_0.gguf\n\n"
        "# TEMPLATE: converted from the Hugging Face chat template (verified on probe conversations).\n"
        'TEMPLATE """{{ if (eq (index .Messages 0).Role "system") }}<s><|system|>\n{{ else }}<s>{{ end }}'
        "{{ range $i, $_ := .Messages }}{{ $last := eq (len (slice $.Messages $i)) 1 }}"
        '{{ if eq .Role "system" }}{{ .Content }}{{ else if eq .Role "user" }}<|user|>\n{{ .Content }}'
        '{{ if $last }}<|assistant|>\n{{ end }}{{ else if eq .Role "assistant" }}<|assistant|>\n{{ .Content }}'
        '{{ if not $last }}</s>{{ end }}{{ end }}{{ end }}"""\n\n'
        'PARAMETER stop "</s>"\nPARAMETER stop "<|user|>"\n')


@pytest.mark.parametrize("template,system", [(None, True), (CHATML, True), (LLAMA3_STYLE, True),
                                             (SYSTEM_IN_USER, False)])
def test_pieces_reproduce_hf_rendering(tok, template, system):
    tok.chat_template = template or tok.chat_template
    pieces = infer_pieces(tok)
    assert pieces is not None and (pieces.system_head is not None) == system
    for messages in CONVERSATIONS:
        if not system and messages[0]["role"] == "system":
            continue
        expected = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        assert pieces.render(messages, add_generation_prompt=True, close_last=False) == expected


def test_unconvertible_template_falls_back_and_says_so(tok, tmp_path):
    tok.chat_template = REWRITES_CONTENT
    text = write_modelfile(tmp_path / "m.gguf", tok).read_text()
    assert "could not be converted" in text and f'TEMPLATE """{GENERIC_TEMPLATE}"""' in text
    tok.chat_template = None
    assert "has no chat template" in write_modelfile(tmp_path / "m.gguf", tok).read_text()


def test_bos_added_by_llama_cpp_is_not_repeated(tmp_path):
    tok = spm_tokenizer()  # adds <s> itself, and its template writes {{ bos_token }} too
    text = write_modelfile(tmp_path / "m.gguf", tok).read_text()
    assert 'TEMPLATE """{{ range' in text and "<s>" not in text.split('TEMPLATE """')[1].split('"""')[0]
    assert "System messages could not be converted" in text and 'PARAMETER stop "</s>"' in text


GO_RENDER = """package main
import ("encoding/json"; "os"; "text/template")
type Message struct { Role string; Content string }
func main() {
	var msgs []Message
	json.Unmarshal([]byte(os.Args[2]), &msgs)
	t := template.Must(template.New("t").Parse(os.Args[1]))
	if err := t.Execute(os.Stdout, map[string]any{"Messages": msgs}); err != nil { panic(err) }
}
"""


@pytest.mark.skipif(shutil.which("go") is None, reason="needs a Go toolchain to execute the template")
def test_go_template_executes_like_hf(tok, tmp_path):
    """Ollama renders TEMPLATE with Go's text/template over .Messages: do exactly that, when Go is installed."""
    (tmp_path / "main.go").write_text(GO_RENDER)
    subprocess.run(["go", "mod", "init", "render"], cwd=tmp_path, check=True, capture_output=True)
    subprocess.run(["go", "build", "-o", "render", "."], cwd=tmp_path, check=True, capture_output=True)
    for template in (tok.chat_template, CHATML, LLAMA3_STYLE):
        tok.chat_template = template
        go = go_template(infer_pieces(tok))
        for messages in CONVERSATIONS:
            payload = json.dumps([{"Role": m["role"], "Content": m["content"]} for m in messages])
            out = subprocess.run([str(tmp_path / "render"), go, payload], capture_output=True, text=True,
                                 check=True).stdout
            assert out == tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
