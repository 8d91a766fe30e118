"""Texts on which our tokenizer (and later the model) must agree with the peer.

Shared by the parity tests: plain and messy English, accents, many scripts, code,
control and invisible characters, edge cases of length. Every character is in
Unicode 14.0 (Python 3.11's `unicodedata`), so both sides know all of them.
"""

_PARAGRAPH = (
    "Dual encoders map queries and documents into one vector space, so that retrieval "
    "becomes a nearest-neighbour search. They are trained with a contrastive loss over "
    "large batches of in-batch negatives, and the quality of the negatives matters a lot. "
)

_CODE_PYTHON = (
    "def mean_pool(hidden, mask):\n"
    '    """Averages token vectors, ignoring padding."""\n'
    "    weights = mask[..., None].astype(hidden.dtype)\n"
    "\treturn (hidden * weights).sum(1) / weights.sum(1).clip(1e-9)\n"
)

_CODE_C = (
    "#include <stdio.h>\n"
    "int main(int argc, char **argv) {\n"
    '\tfor (int i = 0; i < argc; ++i) printf("%s\\n", argv[i]);\n'
    "\treturn 0; /* done */\n"
    "}\n"
)

PARITY_INPUTS: list[str] = [
    # Plain sentences and questions.
    "The quick brown fox jumps over the lazy dog.",
    "How do I reset my password if I no longer have access to my email?",
    "what is the capital of australia",
    "Transformers have largely replaced recurrent networks in NLP.",
    "I can't believe it's already 2024 -- where did the time go?",
    'She said: "Don\'t touch that!" and walked away...',
    # Mixed case and camel case.
    "iPhone, eBay, McDonald's, JavaScript, NASA and the WHO",
    "ThisIsCamelCase and snake_case_name and SCREAMING_SNAKE_CASE",
    "mIxEd CaSe TeXt WiTh WeIrD cApItAlS",
    # Punctuation-heavy.
    "Wait... what?!?! (really) [yes] {no} <maybe> -- 'ok' \"fine\"",
    "!!!???...,,,;;;:::---___***&&&%%%$$$###@@@^^^~~~```|||\\\\///",
    "¡Hola! ¿Qué tal? «Très bien» — “quotes” ‘single’ … • · ‰ § ¶ † ‡",
    # Accents and diacritics.
    "café naïve Ångström résumé façade jalapeño coöperate",
    "Crème brûlée, piñata, São Paulo, Zürich, Kraków, Dvořák",
    "e\u0301 versus \u00e9: combining acute versus precomposed",
    "ΟΔΟΣ ΣΟΦΙΑΣ — final sigma test ΣΑΣ",
    "İstanbul, ıspanak, DİKKAT, Iğdır",
    # European languages.
    "Die Straße ist nass, weil es den ganzen Tag geregnet hat. Übermäßig!",
    "Où est la bibliothèque ? Je voudrais emprunter « Les Misérables ».",
    "El niño comió una manzana mientras su abuela leía el periódico.",
    "Eine Donaudampfschifffahrtsgesellschaftskapitänsmütze ist ein langes Wort.",
    # Other scripts.
    "Η γρήγορη καφέ αλεπού πηδάει πάνω από τον τεμπέλη σκύλο.",
    "Съешь же ещё этих мягких французских булок, да выпей чаю.",
    "مرحبا بالعالم، كيف حالك اليوم؟ السَّلَامُ عَلَيْكُمْ",
    "שלום עולם! מה שלומך היום? בְּרֵאשִׁית",
    "नमस्ते दुनिया, आप कैसे हैं? हिन्दी भाषा",
    "我爱自然语言处理。今天天气很好，我们去公园散步吧！",
    "東京は日本の首都です。ひらがなとカタカナと漢字を使います。",
    "ｶﾀｶﾅ ﾊﾝｶｸ and ＦＵＬＬＷＩＤＴＨ ｌｅｔｔｅｒｓ １２３",
    "안녕하세요, 세계! 한국어 문장을 토큰화합니다.",
    "สวัสดีครับ ภาษาไทยไม่มีการเว้นวรรคระหว่างคำ",
    "Mixed: English 中文 日本語 한국어 русский العربية עברית हिन्दी",
    # Emoji and symbols.
    "I love pizza 🍕🍕 and coffee ☕! 😀😃😄 👍🏽 👨‍👩‍👧‍👦 🇺🇸",
    "∀x ∈ ℝ: x² ≥ 0, ∑ᵢ aᵢ = ∫₀^∞ f(x) dx ≈ π ± ε, √2 ≠ ∞",
    "α + β = γ; Δt → 0; ∂f/∂x; A ⊂ B ∪ C; ¬(p ∧ q) ⇔ (¬p ∨ ¬q)",
    "★☆♠♣♥♦ ©®™ ℃ ℉ № ½ ¼ ¾ ⅓ Ⅻ ⓐ ⒜",
    # Numbers, dates, currency.
    "On 2023-11-05 at 14:30:00 UTC the price rose 3.75% to $1,234.56 (€1.137,20).",
    "Call +1 (555) 123-4567 or 0800 123 456; order #A-1234/56 costs ¥5000 or £42.",
    "3.14159265358979323846264338327950288419716939937510 and 1e-9 and 0xDEADBEEF",
    # URLs, emails, paths.
    "Visit https://www.example.com/path/to/page?query=1&lang=en#section for details.",
    "Email john.doe+newsletter@example.co.uk or support@my-company.io today.",
    "C:\\Users\\Admin\\Documents\\file.txt and /usr/local/bin/python3.11 --version",
    # Code.
    _CODE_PYTHON,
    _CODE_C,
    "SELECT id, name FROM users WHERE age >= 18 AND name LIKE '%son' ORDER BY id;",
    '{"key": [1, 2, 3], "nested": {"a": null, "b": true}}',
    # Control, invisible and unusual whitespace.
    "tab\there\nnewline\r\ncarriage return\x0bvertical tab\x0cform feed",
    "zero\u200bwidth\u200cjoiners\u200dand\ufeffBOM",
    "bell\x07null\x00escape\x1bdelete\x7f and \x85next line",
    "non\u00a0breaking\u00a0space, thin\u2009space, ideographic\u3000space",
    "line\u2028separator and paragraph\u2029separator and narrow\u202fnbsp",
    "replacement \ufffd char and private use \ue000\uf8ff and soft\u00adhyphen",
    "[MASK] tokens [CLS] typed [SEP] literally [PAD] and [UNK], but not [mask]",
    # Empty and whitespace-only.
    "",
    " ",
    "   \t\n  \r\n ",
    "\u00a0\u3000\u2003",
    # Word-length edge cases.
    "a",
    "x" * 100,
    "pneumonoultramicroscopicsilicovolcanoconiosis " + "y" * 101,
    "supercalifragilisticexpialidocious" * 4,
    # Long texts that must be truncated at 256 tokens.
    _PARAGRAPH * 6,
    ("word " * 300).strip(),
    "漢字" * 200,
    "Ünïcödé àççéñtś everywhere! " * 40,
    (_CODE_PYTHON + _CODE_C) * 5,
    "1, 2, 3, 4, 5, 6, 7, 8, 9, 10, " * 30,
]
