"""The training scripts behind ``delta-trl sft`` and ``delta-trl dpo``, laid out like ``trl/scripts``.

Each module defines ``ScriptArguments`` (TRL's, plus what the script needs beyond it), ``main(script_args,
training_args, model_args)``, ``make_parser(prog=None)``, ``parse_args(argv)`` and ``cli(argv)``;
``recipes/sft_delta.py`` and ``recipes/dpo_delta.py`` run them as scripts.
"""
