"""Use `adaptory serve` with the official `openai` package, unchanged.

    ADAPTORY_API_KEY=sk-local adaptory serve --preload shout
    ADAPTORY_API_KEY=sk-local python examples/clients/openai_client.py --model shout

`model` is an adapter reference (name, name:3, name:tag) or a base (base:<ref>).
"""

from __future__ import annotations

import argparse
import os

import openai


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default=os.environ.get("ADAPTORY_URL", "http://127.0.0.1:8000"))
    parser.add_argument("--model", default="shout")
    args = parser.parse_args()
    client = openai.OpenAI(
        base_url=f"{args.url}/v1", api_key=os.environ.get("ADAPTORY_API_KEY", "unused")
    )

    print("models:", ", ".join(m.id for m in client.models.list().data))

    done = client.completions.create(
        model=args.model, prompt="Shout: the cat sat\nAnswer:", max_tokens=16, temperature=0
    )
    print("completion:", repr(done.choices[0].text), done.usage)

    chat = client.chat.completions.create(
        model=args.model,
        messages=[{"role": "user", "content": "hello"}],
        max_tokens=16,
        temperature=0.7,
        seed=1,
    )
    print("chat:", repr(chat.choices[0].message.content))

    print("stream: ", end="", flush=True)
    for chunk in client.chat.completions.create(
        model=args.model,
        messages=[{"role": "user", "content": "tell me about the cat"}],
        max_tokens=24,
        stream=True,
    ):
        if chunk.choices and chunk.choices[0].delta.content:
            print(chunk.choices[0].delta.content, end="", flush=True)
    print()


if __name__ == "__main__":
    main()
