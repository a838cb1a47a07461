"""Regenerates sample.jsonl, the small Korean/English question-answer set the default job trains on, and chat.jsonl,
the multi-turn conversations recipes/tiny-mix.yaml mixes in.

Templated on purpose: the patterns are learnable by a tiny model in a minute, so eval loss clearly falls.
Run: python data/make_sample.py > data/sample.jsonl; python data/make_sample.py chat > data/chat.jsonl
"""

import json
import random
import sys

CAPITALS = [
    ("France", "Paris", "프랑스", "파리"), ("Japan", "Tokyo", "일본", "도쿄"),
    ("Korea", "Seoul", "한국", "서울"), ("Germany", "Berlin", "독일", "베를린"),
    ("Italy", "Rome", "이탈리아", "로마"), ("Spain", "Madrid", "스페인", "마드리드"),
    ("China", "Beijing", "중국", "베이징"), ("Egypt", "Cairo", "이집트", "카이로"),
    ("Canada", "Ottawa", "캐나다", "오타와"), ("Russia", "Moscow", "러시아", "모스크바"),
    ("Thailand", "Bangkok", "태국", "방콕"), ("Greece", "Athens", "그리스", "아테네"),
    ("Vietnam", "Hanoi", "베트남", "하노이"), ("Peru", "Lima", "페루", "리마"),
    ("Kenya", "Nairobi", "케냐", "나이로비"), ("Norway", "Oslo", "노르웨이", "오슬로"),
    ("Austria", "Vienna", "오스트리아", "빈"), ("Poland", "Warsaw", "폴란드", "바르샤바"),
]
WORDS = [
    ("apple", "사과"), ("water", "물"), ("book", "책"), ("school", "학교"), ("friend", "친구"), ("house", "집"),
    ("cat", "고양이"), ("dog", "개"), ("tree", "나무"), ("sea", "바다"), ("mountain", "산"), ("flower", "꽃"),
    ("rain", "비"), ("snow", "눈"), ("sky", "하늘"), ("bread", "빵"), ("milk", "우유"), ("car", "자동차"),
    ("teacher", "선생님"), ("student", "학생"), ("river", "강"), ("moon", "달"), ("sun", "해"), ("star", "별"),
]


def main() -> None:
    rng = random.Random(0)
    rows = []
    for _ in range(70):
        a, b = rng.randint(1, 49), rng.randint(1, 49)
        rows.append({"input": f"What is {a} plus {b}?", "output": f"{a} plus {b} is {a + b}.", "source": "arith_en"})
    for _ in range(70):
        a, b = rng.randint(1, 49), rng.randint(1, 49)
        rows.append({"input": f"{a} 더하기 {b}는 얼마인가요?", "output": f"{a} 더하기 {b}는 {a + b}입니다.",
                     "source": "arith_ko"})
    for country, capital, country_ko, capital_ko in CAPITALS:
        rows.append({"input": f"What is the capital of {country}?",
                     "output": f"The capital of {country} is {capital}.", "source": "capital_en"})
        rows.append({"input": f"{country_ko}의 수도는 어디인가요?",
                     "output": f"{country_ko}의 수도는 {capital_ko}입니다.", "source": "capital_ko"})
    for en, ko in WORDS:
        rows.append({"input": f"Translate to Korean: {en}", "output": ko, "source": "translate"})
        rows.append({"input": f"'{ko}'를 영어로 하면?", "output": f"'{ko}'는 영어로 {en}입니다.",
                     "source": "translate"})
    rng.shuffle(rows)
    for row in rows:
        print(json.dumps(row, ensure_ascii=False))


def chat() -> None:
    """40 conversations of three exchanges (OpenAI `messages`), a running sum; some carry their own system turn."""
    rng = random.Random(1)
    for n in range(40):
        korean = n % 2 == 1
        a, b, c = rng.randint(1, 30), rng.randint(1, 30), rng.randint(1, 30)
        if korean:
            exchanges = [(f"{a} 더하기 {b}는 얼마인가요?", f"{a} 더하기 {b}는 {a + b}입니다."),
                         (f"거기에 {c}를 더하면요?", f"{a + b} 더하기 {c}는 {a + b + c}입니다."),
                         ("처음 숫자는 무엇이었나요?", f"처음 숫자는 {a}였습니다.")]
        else:
            exchanges = [(f"What is {a} plus {b}?", f"{a} plus {b} is {a + b}."),
                         (f"And plus {c}?", f"{a + b} plus {c} is {a + b + c}."),
                         ("What was the first number?", f"The first number was {a}.")]
        turns = [t for q, r in exchanges for t in ({"role": "user", "content": q}, {"role": "assistant", "content": r})]
        if n % 4 == 0:
            turns.insert(0, {"role": "system", "content": "Keep a running total."})
        print(json.dumps({"messages": turns, "source": "chat_ko" if korean else "chat_en"}, ensure_ascii=False))


if __name__ == "__main__":
    chat() if sys.argv[1:] == ["chat"] else main()
