"""Multi-turn conversations, as chat UIs and agents call: a long system prompt shared by many
conversations, then turns that each resend the whole history plus one new user message.

A conversation starts with one of a few system prompts (several hundred tokens each, built
from the bundled documentation passages), runs `num_turns` streamed turns and ends. Turn 1 can
find only the system prompt in a prefix cache (when another conversation sent it before);
every follow-up can find the whole previous exchange, so the prefix-cache hit share of
follow-ups is what prefix-aware balancing and a prefix cache are judged by. No Locust here.
"""

from __future__ import annotations

import random
import secrets
from dataclasses import dataclass, field

from loadtests.calls import CallSpec, messages_spec
from loadtests.prompts import Prompt, PromptSet
from loadtests.tenants import Tenant

TAG = "conversation"
NUM_SYSTEM_PROMPTS = 4
SYSTEM_PROMPT_WORDS = 400        # 490-740 SmolLM2 tokens, 590-810 tiny-llama tokens
NUM_TURNS = 4
REPLY_MAX_TOKENS = 64            # replies stay short, so histories fit small context windows
USER_MESSAGE_MAX_WORDS = 40
MIN_USER_MESSAGES = 16
ROLES = ("the support desk of a Python hosting company", "a code reviewer for a Python team",
         "a patient tutor for new programmers", "the documentation assistant of a library",
         "an on-call engineer's helper", "a technical writer's editor")


@dataclass(frozen=True)
class ConversationSettings:
    num_turns: int = NUM_TURNS
    num_system_prompts: int = NUM_SYSTEM_PROMPTS
    system_prompt_words: int = SYSTEM_PROMPT_WORDS
    reply_max_tokens: int = REPLY_MAX_TOKENS

    def __post_init__(self) -> None:
        for name in ("num_turns", "num_system_prompts", "system_prompt_words",
                     "reply_max_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"conversation {name} must be at least 1, got {self}")


def passage(prompt: Prompt) -> str:
    """A bundled prompt without its first paragraph (the instruction)."""
    _, _, body = prompt.text.partition("\n\n")
    return body or prompt.text


def system_prompts(prompts: PromptSet, num_prompts: int, num_words: int) -> tuple[str, ...]:
    """`num_prompts` distinct system prompts of exactly `num_words` words, deterministic: a
    role line, then reference passages (the longest prompts, dealt round-robin)."""
    passages = sorted((passage(p).split() for p in prompts.prompts), key=len, reverse=True)
    result = []
    for index in range(num_prompts):
        role = ROLES[index % len(ROLES)]
        words = (f"You are {role} (desk {index + 1}). Answer briefly and only from the "
                 f"reference text below; say so when it does not cover the question. "
                 f"Reference:").split()
        for dealt in passages[index::num_prompts] or passages:
            if len(words) >= num_words:
                break
            words += dealt
        while len(words) < num_words:   # a tiny prompt set: repeat what there is
            words += words[:num_words - len(words)]
        result.append(" ".join(words[:num_words]))
    return tuple(result)


def user_messages(prompts: PromptSet) -> tuple[Prompt, ...]:
    """Short prompts for user turns (at least a few, shortest first when few are short)."""
    short = [p for p in prompts.prompts if len(p.text.split()) <= USER_MESSAGE_MAX_WORDS]
    if len(short) < MIN_USER_MESSAGES:
        short = sorted(prompts.prompts, key=lambda p: len(p.text))[:MIN_USER_MESSAGES]
    return tuple(short)


@dataclass
class Conversation:
    conversation_id: str
    tenant: Tenant
    num_turns: int
    messages: list[dict[str, str]] = field(default_factory=list)
    num_answered: int = 0          # turns answered so far
    num_context_tokens: int | None = None   # the last turn's prompt + reply tokens (usage)

    @property
    def next_turn(self) -> int:
        return self.num_answered + 1

    @property
    def is_finished(self) -> bool:
        return self.num_answered >= self.num_turns

    def answered(self, user_text: str, reply: str, num_context_tokens: int | None) -> None:
        self.messages += [{"role": "user", "content": user_text},
                          {"role": "assistant", "content": reply}]
        self.num_answered += 1
        self.num_context_tokens = num_context_tokens


@dataclass(frozen=True)
class Turn:
    """One turn to send: the call and what `answered` needs afterwards."""

    conversation: Conversation
    number: int                    # 1 for the first turn
    user_text: str
    spec: CallSpec
    # Tokens this turn's prompt repeats from the previous turn (its prompt + reply): what a
    # prefix cache could at most serve of its own history; None on turn 1 or without usage.
    num_reusable_tokens: int | None = None


class ConversationMaker:
    """Starts conversations and makes each next turn's call."""

    def __init__(self, prompts: PromptSet, model: str, settings: ConversationSettings,
                 max_tokens_cap: int | None = None):
        self.model = model
        self.settings = settings
        self.system_prompts = system_prompts(prompts, settings.num_system_prompts,
                                             settings.system_prompt_words)
        self.user_prompts = user_messages(prompts)
        cap = settings.reply_max_tokens
        self.max_tokens_cap = min(cap, max_tokens_cap) if max_tokens_cap else cap

    def start(self, tenant: Tenant, rng: random.Random) -> Conversation:
        system = {"role": "system", "content": rng.choice(self.system_prompts)}
        return Conversation(secrets.token_hex(6), tenant, self.settings.num_turns, [system])

    def turn(self, conversation: Conversation, rng: random.Random) -> Turn:
        prompt = rng.choice(self.user_prompts)
        messages = [*conversation.messages, {"role": "user", "content": prompt.text}]
        spec = messages_spec(self.model, messages, min(prompt.max_tokens, self.max_tokens_cap),
                             stream=True, tag=TAG)
        return Turn(conversation, conversation.next_turn, prompt.text, spec,
                    conversation.num_context_tokens)


class ConversationPool:
    """Open loop: conversations waiting for their next turn, per tenant.

    An arrival for a tenant continues one of its idle conversations (at random) once
    `num_open` of them are idle, else starts a new one; a conversation is idle between an
    answer and its next turn, so a slow server (answers late) makes the pool start more
    conversations instead of holding arrivals back. Failed or finished ones leave the pool.
    """

    def __init__(self, maker: ConversationMaker, num_open: int):
        self.maker = maker
        self.num_open = max(1, num_open)
        self.idle: dict[str, list[Conversation]] = {}

    def take(self, tenant: Tenant, rng: random.Random) -> Turn:
        idle = self.idle.setdefault(tenant.name, [])
        if len(idle) >= self.num_open:
            conversation = idle.pop(rng.randrange(len(idle)))
        else:
            conversation = self.maker.start(tenant, rng)
        return self.maker.turn(conversation, rng)

    def finish(self, turn: Turn, reply: str | None, num_context_tokens: int | None) -> None:
        """`reply` None: the call failed, and the conversation is dropped."""
        if reply is None:
            return
        turn.conversation.answered(turn.user_text, reply, num_context_tokens)
        if not turn.conversation.is_finished:
            self.idle.setdefault(turn.conversation.tenant.name, []).append(turn.conversation)
