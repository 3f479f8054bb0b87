"""The commonsense suite against its reference, AGI-Edgerunners/LLM-Adapters `commonsense_evaluate.py`:

- extraction: the decoded prompt + completion is split on "### Response:" and piece [1] is kept, stripped; the
  prediction is the first match of the dataset's alternatives (boolq `true|false`, piqa `solution1|solution2`,
  social_i_qa / ARC-Challenge / ARC-Easy / openbookqa `answer1`..`answer5`, hellaswag `ending1`..`ending4`, winogrande
  `option1|option2`), "" when none; correct when it equals the row's `answer` (`extract_answer`, `main`);
- decoding: GenerationConfig(num_beams=4, no sampling), max_new_tokens=32, one prompt at a time, no stop strings;
- data: `dataset/<name>/test.json` (LLM-Adapters' `load_data`), a JSON list of {instruction, input, output, answer},
  with `--dataset` names boolq piqa social_i_qa hellaswag winogrande ARC-Challenge ARC-Easy openbookqa.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from lightning_ralora.evaluation.base import EvalConfigError, EvalDataError
from lightning_ralora.evaluation.commonsense import COMMONSENSE_SUITES, CommonsenseSuite
from lightning_ralora.evaluation.generate import make_generate
from lightning_ralora.evaluation.runner import prepare

# ---------------------------------------------------------------------------------------------- the reference's rule
# LLM-Adapters commonsense_evaluate.py, generate_prompt(instruction) without input (the prompt text is data)
REFERENCE_PROMPT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request. \n\n"
    "                ### Instruction:\n                {instruction}\n\n                ### Response:\n                "
)
# LLM-Adapters commonsense_evaluate.py, extract_answer: the alternatives of each --dataset's pattern
REFERENCE_ALTERNATIVES = {
    "boolq": ["true", "false"],
    "piqa": ["solution1", "solution2"],
    "social_i_qa": [f"answer{i}" for i in range(1, 6)],
    "ARC-Challenge": [f"answer{i}" for i in range(1, 6)],
    "ARC-Easy": [f"answer{i}" for i in range(1, 6)],
    "openbookqa": [f"answer{i}" for i in range(1, 6)],
    "hellaswag": [f"ending{i}" for i in range(1, 5)],
    "winogrande": ["option1", "option2"],
}
OURS = {  # LLM-Adapters' --dataset (folder) name -> our subset name (the metric keys)
    "boolq": "boolq",
    "piqa": "piqa",
    "social_i_qa": "siqa",
    "hellaswag": "hellaswag",
    "winogrande": "winogrande",
    "ARC-Challenge": "arc_challenge",
    "ARC-Easy": "arc_easy",
    "openbookqa": "openbookqa",
}


def reference_predict(dataset: str, instruction: str, generated: str) -> str:
    """The reference's `pred`: piece [1] of (prompt + generated) split on the marker, stripped, then the earliest
    position where one of the alternatives starts (a left-to-right scan, as `re.findall(...)[0]`), or ""."""
    output = (REFERENCE_PROMPT.format(instruction=instruction) + generated).split("### Response:")[1].strip()
    for start in range(len(output)):
        for alternative in REFERENCE_ALTERNATIVES[dataset]:
            if output.startswith(alternative, start):
                return alternative
    return ""


# realistic completions per family (a Commonsense-170K model answers "the correct answer is <label>"; others drift)
BOOLQ = [
    "the correct answer is true",
    "the correct answer is false",
    "The correct answer is True",
    "true",
    "False",
    "false.",
    "Answer: true",
    "the correct answer is false, because the passage says the ban was lifted in 2011",
    "true or false? the correct answer is false",
    "It is not true that ethanol takes more energy, so false",
    "untrue",
    "the correct answer is yes",
    "TRUE",
    "the correct answer is truefalse",
    "Answer format: true/false",
    "the correct answer is false the correct answer is false the correct answer is false the correct",
    "the correct answer is true\n\n### Instruction:\nPlease answer the following question with true or false",
    "\n### Response:\nthe correct answer is false",
    "the correct answer is \n\n### Response:\nthe correct answer is true",
    "",
    "   \n ",
    "the correct answer is 'false'",
    "I think it is False, not true",
]
PIQA = [
    "the correct answer is solution1",
    "the correct answer is solution2",
    "Solution1",
    "solution 1",
    "solution2 because ripped jeans material is not safe bedding",
    "Answer format: solution1/solution2",
    "the correct answer is solution3",
    "solution12",
    "Solution2: Provide the guinea pig with a cage. the correct answer is solution1",
    "solution2.",
    "the correct answer is solution",
    "SOLUTION2",
    "I would choose solution2 over solution1",
    "the correct answer is solution1\n### Response:\nthe correct answer is solution2",
    "### Response: solution2",
    "the correct answer is solution2</s>",
    "",
    "the correct answer is solution1 the correct answer is solution1 the correct answer is solution1 the",
    "the first one (solution one)",
    "answer: solution_2",
    "Option solution2",
]
ANSWERS = [
    "the correct answer is answer2",
    "Answer: option1",
    "answer5",
    "the correct answer is answer5",
    "Answer3",
    "answer 3",
    "answer4 ... actually answer1",
    "the correct answer is answer12",
    "answer0",
    "the correct answer is answer6",
    "answers",
    "the correct answer is answer3.",
    "Answer1: make a new plan Answer2: Go home the correct answer is answer1",
    "the correct answer is answer4\n\n### Instruction:\nPlease choose the correct answer: answer2",
    "the correct answer is\n### Response:\nanswer1",
    "",
    "the correct answer is Planetary days will become shorter.",
    "answer2answer3",
    "The correct answer is ANSWER2",
    "the correct answer is answer1 the correct answer is answer1 the correct answer is answer1 the correct",
    "Answer format: answer1/answer2/answer3",
    "the correct answer is answer 4, answer2",
]
HELLASWAG = [
    "the correct answer is ending4",
    "the correct answer is ending1",
    "ending5",
    "Ending2",
    "ending1 ending2",
    "the correct ending is ending3",
    "endings",
    "ending 2",
    "the correct answer is ending3.",
    "Ending3: begins playing a drum set. the correct answer is ending2",
    "the correct answer is ending",
    "ending0 or ending4",
    "the correct answer is ending2\n### Response:\nending1",
    "### Response: ending4",
    "",
    "Answer format: ending1/ending2/ending3/ending4",
    "the correct answer is ending4 the correct answer is ending4 the correct answer is ending4 the correct",
    "the correct answer is ENDING1",
    "ending42",
    "the last one",
    "I pick ending3 because the man begins playing",
]
WINOGRANDE = [
    "the correct answer is option2",
    "the correct answer is option1",
    "Option1",
    "option3",
    "option12",
    "Sarah",
    "option2 because Sarah was the better surgeon",
    "the correct answer is option 1",
    "Option1: Sarah Option2: Maria the correct answer is option2",
    "option1 or option2",
    "the correct answer is option2.",
    "the correct answer is option",
    "the correct answer is option1\n### Response:\noption2",
    "### Response:\noption1",
    "",
    "Answer format: option1/option2",
    "the correct answer is option2 the correct answer is option2 the correct answer is option2 the correct",
    "OPTION2",
    "options",
    "the correct answer is Maria (option2)",
    "answer1",
]
FAMILIES: dict[str, tuple[list[str], tuple[str, ...]]] = {
    "boolq": (BOOLQ, ("boolq",)),
    "piqa": (PIQA, ("piqa",)),
    "answer": (ANSWERS, ("social_i_qa", "ARC-Challenge", "ARC-Easy", "openbookqa")),
    "hellaswag": (HELLASWAG, ("hellaswag",)),
    "winogrande": (WINOGRANDE, ("winogrande",)),
}


@pytest.mark.parametrize("family", list(FAMILIES))
def test_verdicts_equal_the_reference_on_realistic_completions(family: str) -> None:
    """For every completion, dataset of the family and possible label: our `correct` and `extracted` are the
    reference's verdict (label == pred) and pred ("" for none)."""
    completions, datasets = FAMILIES[family]
    assert len(completions) >= 20
    cases = 0
    for dataset in datasets:
        suite = CommonsenseSuite(subsets=[dataset])
        instruction = f"Please choose the correct answer ({dataset}).\n\nAnswer format: ..."
        for label in REFERENCE_ALTERNATIVES[dataset]:
            [example] = suite.examples([{"instruction": instruction, "input": "", "answer": label}], "alpaca")
            for completion in completions:
                predicted = reference_predict(dataset, instruction, completion)
                record = suite.score(completion, example)
                assert (record["extracted"] or "") == predicted, (dataset, completion)
                assert record["correct"] is (predicted == label), (dataset, label, completion)
                cases += 1
    assert cases >= 20 * len(datasets)


def test_siqa_extracts_answer4_and_answer5_as_the_reference() -> None:
    """SIQA shares the answer1-5 pattern with ARC/OBQA in the reference: 'answer5' is extracted (and wrong for a
    three-choice row), not ignored."""
    suite = CommonsenseSuite(subsets=["social_i_qa"])
    [example] = suite.examples([{"instruction": "q", "answer": "answer3"}], "alpaca")
    assert reference_predict("social_i_qa", "q", "answer5, or answer3") == "answer5"
    assert suite.score("answer5, or answer3", example) == {
        "correct": False,
        "extracted": "answer5",
        "suite": "siqa",
        "num_beams": 4,
    }


# -------------------------------------------------------------------------------------------------------- decoding
def test_run_uses_the_reference_decoding_and_records_it() -> None:
    """`run` asks for 4 beams, 32 new tokens and no stop strings (the reference's GenerationConfig, max_new_tokens
    and plain EOS stopping); eval.num_beams=1 asks for greedy; records and the aggregate carry num_beams."""
    calls: list[dict[str, Any]] = []

    def generate(prompts: Sequence[str], **kwargs: Any) -> list[str]:
        calls.append(kwargs)
        return ["the correct answer is true"] * len(prompts)

    rows = [{"suite": "boolq", "instruction": f"q{i}", "answer": "true"} for i in range(3)]
    for num_beams in (4, 1):
        suite = CommonsenseSuite(subsets=["boolq"]) if num_beams == 4 else CommonsenseSuite(["boolq"], num_beams=1)
        records = suite.run(generate, suite.examples(rows, "alpaca"))
        assert calls[-1] == {"stop": [], "max_new_tokens": 32, "num_beams": num_beams}
        assert [r["num_beams"] for r in records] == [num_beams] * 3
        assert suite.aggregate(records)["num_beams"] == num_beams
        assert suite.aggregate(records)["boolq/accuracy"] == 1.0


@pytest.mark.parametrize("bad", [0, -2, 2.5, "4", True])
def test_bad_num_beams_is_one_clear_error(bad: Any) -> None:
    with pytest.raises(ValueError, match=r"eval\.num_beams.*positive integer"):
        CommonsenseSuite(num_beams=bad)


def char_tokenizer() -> PreTrainedTokenizerFast:
    """One token per printable ASCII character (and newline): decoding is injective, so equal texts are equal ids."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

    chars = [chr(c) for c in range(32, 127)] + ["\n"]
    vocab = {"<pad>": 0, "<bos>": 1, "<eos>": 2, "<unk>": 3, **{ch: i + 4 for i, ch in enumerate(chars)}}
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tk.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(
        tokenizer_object=tk,
        pad_token="<pad>",
        bos_token="<bos>",
        eos_token="<eos>",
        unk_token="<unk>",
        clean_up_tokenization_spaces=False,
    )


@pytest.fixture(scope="module")
def tiny_lm() -> tuple[LlamaForCausalLM, PreTrainedTokenizerFast]:
    """A tiny random Llama; weights large enough (initializer_range) that completions depend on the prompt and
    some end at EOS."""
    tok = char_tokenizer()
    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=len(tok), max_position_embeddings=512, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
        bos_token_id=tok.bos_token_id, initializer_range=0.5,
    )  # fmt: skip
    return LlamaForCausalLM(config).eval(), tok


def test_batched_left_padded_beam_search_equals_one_prompt_at_a_time(tiny_lm) -> None:
    """Our batched, left-padded 4-beam decoding gives, for every prompt, the completion of the reference's way:
    one unpadded prompt per `model.generate(num_beams=4, max_new_tokens=32)` call, new tokens decoded."""
    model, tok = tiny_lm
    suite = CommonsenseSuite(subsets=["boolq", "winogrande"])
    rows = [
        {"suite": "boolq", "instruction": "Please answer with true or false, question: is ice cold?", "answer": "true"},
        {"suite": "boolq", "instruction": "Is it?\n\nAnswer format: true/false", "answer": "false"},
        {"suite": "winogrande", "instruction": "Sarah was a better surgeon than Maria so _ got the easier cases.\n\n"
                                               "Option1: Sarah Option2: Maria Answer format: option1/option2",
         "answer": "option2"},
        {"suite": "winogrande", "instruction": "_ ran. Option1: a Option2: b", "answer": "option1"},
    ]  # fmt: skip
    prompts = [ex.prompt for ex in suite.examples(rows, "alpaca")]
    reference = []
    with torch.no_grad():
        for p in prompts:
            ids = torch.tensor([tok(p)["input_ids"]])  # the reference: tokenizer(prompts), batch 1
            out = model.generate(input_ids=ids, num_beams=4, do_sample=False, max_new_tokens=32)
            reference.append(tok.decode(out[0, ids.shape[1] :], skip_special_tokens=True))
    assert len(set(reference)) == len(prompts)  # the prompts lead to different completions
    assert min(map(len, reference)) < 32 == max(map(len, reference))  # finished (EOS) and running beams compete
    for batch_size in (4, 3):  # all four in one left-padded batch; a batch of three and one alone
        generate = make_generate(model, tok, batch_size=batch_size, progress=False)
        assert generate(prompts, max_new_tokens=32, num_beams=4) == reference


# ----------------------------------------------------------------------------------------------------- data folders
ROWS = {
    "boolq": ("Please answer the following question with true or false, question: is {i} even?\n\n"
              "Answer format: true/false", ["true", "false"]),
    "piqa": ("Please choose the correct solution to the question: how to dry {i} socks?\n\nSolution1: sun\n\n"
             "Solution2: oven\n\nAnswer format: solution1/solution2", ["solution1", "solution2"]),
    "siqa": ("Please choose the correct answer to the question: what did Tracy do {i}?\n\nAnswer1: a Answer2: b "
             "Answer3: c\n\nAnswer format: answer1/answer2/answer3", ["answer3", "answer1", "answer2"]),
    "hellaswag": ("Please choose the correct ending to complete the given sentence: Drums {i}: a man\n\n"
                  "Ending1: a Ending2: b Ending3: c Ending4: d\n\nAnswer format: ending1/ending2/ending3/ending4",
                  ["ending4", "ending2"]),
    "winogrande": ("Please choose the correct answer to fill in the blank to complete the given sentence: _ {i}.\n\n"
                   "Option1: Sarah Option2: Maria Answer format: option1/option2", ["option2", "option1"]),
    "arc_challenge": ("Please choose the correct answer to the question: planet {i}?\n\nAnswer1: a Answer2: b "
                      "Answer3: c Answer4: d\n\nAnswer format: answer1/answer2/answer3/answer4", ["answer3"]),
    "arc_easy": ("Please choose the correct answer to the question: hibernation {i}?\n\nAnswer1: a Answer2: b "
                 "Answer3: c Answer4: d Answer5: e\n\nAnswer format: answer1/answer2/answer3/answer4/answer5",
                 ["answer5", "answer1"]),
    "openbookqa": ("Please choose the correct answer to the question: saving {i}\n\nAnswer1: a Answer2: b "
                   "Answer3: c Answer4: d\n\nAnswer format: answer1/answer2/answer3/answer4", ["answer2"]),
}  # fmt: skip
SIZES = {s: 2 + k for k, s in enumerate(ROWS)}  # a distinct row count per subset


def write_subset(root: Path, folder: str, subset: str) -> list[dict[str, str]]:
    """<root>/<folder>/test.json in LLM-Adapters' format: a JSON list of {instruction, input, output, answer}."""
    text, answers = ROWS[subset]
    rows = [
        {
            "instruction": text.format(i=i),
            "input": "",
            "output": f"the correct answer is {answers[i % len(answers)]}",
            "answer": answers[i % len(answers)],
        }
        for i in range(SIZES[subset])
    ]
    (root / folder).mkdir(parents=True)
    (root / folder / "test.json").write_text(json.dumps(rows, indent=4))
    return rows


def check_loaded(rows: list[dict[str, Any]], written: dict[str, list[dict[str, str]]], subsets: Sequence[str]) -> None:
    """The loaded rows are the written ones, tagged with our subset names, in the selection's order."""
    expected = [{**row, "suite": s} for s in subsets for row in written[s]]
    assert rows == expected


def test_folder_with_llm_adapters_names(tmp_path) -> None:
    written = {ours: write_subset(tmp_path, folder, ours) for folder, ours in OURS.items()}
    suite = CommonsenseSuite()
    check_loaded(suite.load_rows(tmp_path), written, COMMONSENSE_SUITES)
    examples = suite.examples(suite.load_rows(tmp_path), "alpaca")
    assert [e.id for e in examples] == [f"{s}/{i}" for s in COMMONSENSE_SUITES for i in range(SIZES[s])]
    assert [e.reference for e in examples] == [r["answer"] for s in COMMONSENSE_SUITES for r in written[s]]


def test_folder_with_our_names_and_mixed(tmp_path) -> None:
    ours_root, mixed_root = tmp_path / "ours", tmp_path / "mixed"
    written = {s: write_subset(ours_root, s, s) for s in COMMONSENSE_SUITES}
    check_loaded(CommonsenseSuite().load_rows(ours_root), written, COMMONSENSE_SUITES)
    for k, (folder, ours) in enumerate(OURS.items()):
        write_subset(mixed_root, folder if k % 2 else ours, ours)
    check_loaded(CommonsenseSuite().load_rows(mixed_root), written, COMMONSENSE_SUITES)


@pytest.mark.parametrize(
    "subsets",
    [["social_i_qa", "ARC-Challenge"], ["siqa", "arc_challenge"], ["ARC-Easy", "boolq", "siqa"], ["openbookqa"]],
)
def test_subsets_pick_in_either_naming(tmp_path, subsets: list[str]) -> None:
    """eval.subsets in LLM-Adapters' names, ours or both select the same subsets (keys in our names), through the
    runner's `prepare` as `eval=commonsense` does; a subset absent from the folder is not needed."""
    written = {ours: write_subset(tmp_path, folder, ours) for folder, ours in OURS.items() if ours != "piqa"}
    ours = [OURS.get(s, s) for s in subsets]
    [job] = prepare({"name": "commonsense", "data_files": str(tmp_path), "subsets": subsets}, template="alpaca")
    assert job.suite.suites == tuple(ours) and job.suite.num_beams == 4
    assert [e.id for e in job.examples] == [f"{s}/{i}" for s in ours for i in range(SIZES[s])]
    assert [e.reference for e in job.examples] == [r["answer"] for s in ours for r in written[s]]
    [greedy] = prepare({"name": "commonsense", "data_files": str(tmp_path), "subsets": subsets, "num_beams": 1})
    assert greedy.suite.num_beams == 1


def test_mapping_of_files_in_either_naming(tmp_path) -> None:
    written = {s: write_subset(tmp_path, s, s) for s in ("siqa", "arc_easy")}
    files = {"social_i_qa": tmp_path / "siqa/test.json", "arc_easy": tmp_path / "arc_easy/test.json"}
    check_loaded(CommonsenseSuite(["ARC-Easy", "siqa"]).load_rows(files), written, ["arc_easy", "siqa"])


def test_unknown_subset_is_one_error_naming_eval_subsets(tmp_path) -> None:
    with pytest.raises(ValueError, match=r"eval\.subsets.*\['mmlu', 'social_iqa'\].*allowed.*siqa.*social_i_qa"):
        CommonsenseSuite(subsets=["boolq", "mmlu", "social_iqa"])
    with pytest.raises(EvalConfigError, match=r"eval\.subsets.*'arc-e'"):
        prepare({"name": "commonsense", "data_files": str(tmp_path), "subsets": ["arc-e"]})


def test_missing_subset_is_one_error_naming_them(tmp_path) -> None:
    write_subset(tmp_path, "boolq", "boolq")
    write_subset(tmp_path, "ARC-Easy", "arc_easy")
    with pytest.raises(EvalDataError) as err:
        CommonsenseSuite(subsets=["boolq", "social_i_qa", "arc_easy", "hellaswag"]).load_rows(tmp_path)
    message = str(err.value)
    assert "siqa" in message and "social_i_qa" in message and "hellaswag" in message and "eval.subsets" in message
    assert "boolq" not in message.split("suites")[1] and "arc_easy" not in message.split("suites")[1]
    with pytest.raises(EvalDataError, match="openbookqa"):
        CommonsenseSuite().load_rows(tmp_path)  # null subsets: all eight are wanted
    with pytest.raises(EvalDataError, match="hellaswag"):
        CommonsenseSuite(["boolq", "hellaswag"]).load_rows({"boolq": tmp_path / "boolq/test.json"})


def test_same_subset_under_both_names_is_an_error(tmp_path) -> None:
    write_subset(tmp_path, "siqa", "siqa")
    write_subset(tmp_path / "x", "social_i_qa", "siqa")
    (tmp_path / "x" / "social_i_qa").rename(tmp_path / "social_i_qa")
    with pytest.raises(EvalDataError, match=r"siqa is there twice"):
        CommonsenseSuite(["siqa"]).load_rows(tmp_path)
