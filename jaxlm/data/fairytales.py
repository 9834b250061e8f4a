"""Seeded generator of short English fairy tales: the built-in training corpus.

jaxlm trains on this text by default so that a first run needs no download and
no data files. The tales are produced from word lists and sentence templates
by a story grammar: an opening, a hero and a problem, a journey, one to three
helpers met on the way (with dialogue in quotation marks), a confrontation, a
resolution and an ending. Every stage has several templates and every slot a
pool of words, so a model has to learn grammar, agreement (he/she/it, his/her)
and story structure rather than memorise a few sentences.

Only the standard library is used, and all randomness comes from one
``random.Random(seed)``, so the same seed gives the same text on any machine
and any Python 3.11+. The output is plain ASCII with straight double quotes.
"""

from __future__ import annotations

import random
import re
from collections.abc import Iterator

__all__ = ["generate_fairy_tales", "iter_fairy_tales"]

# ----------------------------------------------------------------- word lists
# Characters are (kind, gender); gender picks the pronouns below.
PRONOUNS = {"f": ("she", "her", "her"), "m": ("he", "him", "his"), "n": ("it", "it", "its")}
FEMALE_NAMES = ("Anna", "Greta", "Elsa", "Rosalind", "Marigold", "Liesel", "Clara", "Ilse", "Brianna", "Mira",
                "Hedda", "Lotte", "Rose", "Isolde", "Nell", "Maren", "Tilda", "Agnes", "Solveig", "Edith",
                "Ada", "Lina", "Wren", "Bella", "Frida", "Katrin", "Olga", "Elowen", "Juniper", "Mabel")
MALE_NAMES = ("Hans", "Jack", "Tomas", "Peter", "Ivan", "Lukas", "Oskar", "Felix", "Anton", "Jakob", "Emil",
              "Finn", "Henrik", "Matthias", "Pavel", "Rupert", "Kaspar", "Tobias", "Aldo", "Bram", "Conrad",
              "Dimitri", "Gregor", "Hugo", "Leon", "Milo", "Niko", "Otto", "Silas", "Wendel")
VILLAIN_NAMES = {"f": ("Morgana", "Baba Yaga", "Hexla", "Vorga", "Malva", "Griselda", "Nightshade"),
                 "m": ("Grimbold", "Skarn", "Zoltan", "Mordrak", "Grendel", "Rumpel", "Korvath",
                       "Thorne", "Gristle", "Balthazar")}
HERO_KINDS = (("princess", "f"), ("prince", "m"), ("miller's daughter", "f"), ("shepherd boy", "m"),
              ("woodcutter's son", "m"), ("goose girl", "f"), ("tailor", "m"), ("fisherman's daughter", "f"),
              ("farmer's son", "m"), ("orphan girl", "f"), ("soldier", "m"), ("weaver's daughter", "f"),
              ("cobbler's son", "m"), ("kitchen maid", "f"), ("fox cub", "m"), ("hare", "f"))
HERO_ADJS = ("brave", "kind", "clever", "poor", "gentle", "curious", "humble", "cheerful", "faithful",
             "quiet", "young", "good-hearted", "stubborn", "patient", "merry")
HELPER_KINDS = (("fox", "m"), ("talking crow", "m"), ("old woman", "f"), ("little mouse", "f"),
                ("grey wolf", "m"), ("white dove", "f"), ("dwarf", "m"), ("frog", "m"), ("owl", "f"),
                ("bear", "m"), ("fairy", "f"), ("hedgehog", "m"), ("hermit", "m"), ("swan", "f"),
                ("beetle", "n"), ("old fisherman", "m"), ("goat", "f"), ("raven", "m"), ("bee", "n"),
                ("pike", "m"))
HELPER_ADJS = ("old", "little", "wise", "ragged", "tired", "tiny", "grey", "clever", "lame", "shy",
               "talkative", "hungry", "ancient", "sleepy")
VILLAIN_KINDS = (("old witch", "f"), ("troll", "m"), ("giant", "m"), ("dragon", "m"), ("sorcerer", "m"),
                 ("ogre", "m"), ("sea witch", "f"), ("goblin king", "m"), ("wicked queen", "f"),
                 ("enchantress", "f"))
VILLAIN_ADJS = ("wicked", "cruel", "greedy", "jealous", "crafty", "terrible", "grim", "spiteful", "mighty")
RELATIVES = (("mother", "f"), ("father", "m"), ("grandmother", "f"), ("grandfather", "m"), ("old aunt", "f"),
             ("uncle", "m"))
VICTIMS = (("little brother", "m"), ("sister", "f"), ("best friend", "m"), ("twin sister", "f"),
           ("old father", "m"), ("little cousin", "f"))
HOMES = ("a little village at the edge of the forest", "a castle on a green hill",
         "a cottage by the sea shore", "a mill beside a rushing river", "a poor hut high in the mountains",
         "a busy town by the river", "a farm in a quiet valley", "a kingdom by the sea",
         "a village among the vineyards")
JOURNEY_PLACES = ("the dark forest", "a high mountain pass", "the windy sea shore", "a deep valley",
                  "a grey marsh", "a wide meadow full of flowers", "the cold river", "a field of tall barley",
                  "a wood of silver birches", "a lonely heath", "the foothills of the mountains",
                  "a stony desert")
SIGHTS = ("the trees were so tall that they hid the sun", "not a single bird was singing",
          "the grass shone like silver in the moonlight", "an old road wound between grey stones",
          "the wind whispered strange words", "the fog lay thick as milk", "the river sang over the pebbles",
          "wolves howled far away")
GOALS = ("the glass mountain", "the castle beyond the hills", "the dark tower in the marsh",
         "the cave under the mountain", "the island in the sea", "the ice palace in the north",
         "the house on chicken legs", "the garden at the end of the world", "the ruined abbey",
         "the copper castle", "the valley of mists", "the old mill on the moor")
OBJECTS = ("golden key", "magic mirror", "silver apple", "enchanted ring", "crystal flower", "golden feather",
           "silver bell", "cloak of stars", "golden egg", "water of life", "singing harp", "ruby heart",
           "moonstone", "silver spindle", "golden comb")
GIFTS = ("a white pebble", "a grey feather", "a red thread", "a hazelnut", "a wooden whistle", "a small comb",
         "a drop of honey", "a bone needle", "a piece of amber", "a tiny bell")
GIFT_EFFECTS = ("a great forest sprang up behind {him}", "a wide river rushed between them",
                "a thick mist covered the road", "a mountain of glass rose out of the ground",
                "a fierce wind blew the {vkind} far away", "the {vkind} fell into a deep sleep")
PROVISIONS = ("a loaf of bread and a flask of water", "three copper coins",
              "a little cake baked in the ashes", "an old cloak and a walking stick",
              "a piece of cheese and an apple", "a blessing and a warm scarf")
TRAITS = ("kind", "brave", "clever", "honest", "small", "quick", "gentle", "poor", "merry", "shy",
          "hard-working", "bold")
NUMBERS = ("three", "seven", "many", "two", "nine", "twelve")
PROVERBS = ("A kind heart is worth more than gold.", "Whoever is patient will have good luck.",
            "Even the smallest creature may be a great friend.", "The truth is the best road home.",
            "Greed eats its own dinner.", "Help others, and help will find you.",
            "A brave heart walks farther than swift feet.")
RIDDLES = (("What runs but never walks, and has a mouth but never speaks?", "A river"),
           ("What grows bigger the more you take away from it?", "A hole"),
           ("What can you catch but never throw?", "A cold"),
           ("What belongs to you, but others use it more than you do?", "Your name"),
           ("What can fill a room but takes up no space?", "Light"),
           ("What has roots nobody sees and is taller than the trees?", "A mountain"),
           ("What flies without wings and cries without eyes?", "A cloud"))

OPENINGS = (
    "Once upon a time, in {home}, there lived a {hadj} {hkind} named {H}.",
    "Long ago, when wishing still helped, there was a {hadj} {hkind} called {H}, who lived in {home}.",
    "There was once a {hadj} {hkind} named {H}, who lived with {his} {rel} in {home}.",
    "In a land far away, beyond seven mountains and seven rivers, lived a {hkind} named {H}.",
    "Many years ago, in {home}, a {hkind} named {H} lived with {his} {rel}.",
    "Once there was, and once there was not, a {hadj} {hkind} named {H}.",
    "Far away and long ago, in {home}, there was a {hkind} whose name was {H}.",
)
DESCRIPTIONS = (
    "{He} was {t1} and {t2}, and everyone who knew {him} loved {him}.",
    "Every morning {he} fetched water from the well, and every evening {he} sang by the fire.",
    "{H} had nothing in the world but {prov}, yet {he} was never unhappy.",
    "{His} {rel} often said, \"{proverb}\"",
    "{He} was not very {t3}, but {he} was {t1}, and that would matter more than anyone knew.",
    "People said that there was no {hkind} in all the land as {t1} as {H}.",
)
PROBLEMS = (  # (what goes wrong, why the hero travels, how it is put right at the end)
    ("But one day a {vadj} {vkind} named {V} came out of {goal} and stole the {obj} from {his} {rel}.",
     "to bring back the {obj}", "{H} gave the {obj} back to {his} {rel}, who wept with joy."),
    ("One winter {his} {rel} fell ill, and no doctor could help. "
     "\"Only the {obj} from {goal} can cure me,\" {rhe} whispered.", "to find the {obj} for my {rel}",
     "{His} {rel} touched the {obj}, and at once {rhe} grew well and strong again."),
    ("Then the {vadj} {vkind} {V} cast a spell on {his} {vic}, who turned into a stone statue.",
     "to break the spell on my {vic}",
     "{H} held up the {obj}, the spell was broken, and {his} {vic} stood there alive and well."),
    ("Then a great drought came over the land, and the wells dried up. A wise woman said that "
     "only the {obj} hidden in {goal} could bring back the rain.", "to fetch the {obj} and bring back the rain",
     "When {H} laid the {obj} beside the old well, rain began to fall and the fields grew green again."),
    ("One dark night the {vkind} {V} carried off {his} {vic} to {goal} and locked {vichim} in with the {obj}.",
     "to rescue my {vic}", "{H} opened the door with the {obj}, and {his} {vic} ran out into {his} arms."),
    ("One day {H} dropped the {obj} into the deep well, and a {vadj} {vkind} named {V} "
     "snatched it and carried it away to {goal}.",
     "to get back the {obj}", "{H} put the {obj} back in its place, and nobody ever lost it again."),
)
DECISIONS = (
    "\"I will go,\" said {H}. \"You are too {weak},\" said {his} {rel}, \"and the road is long.\" "
    "\"Even so, I must try,\" answered {H}.",
    "\"Let me go,\" begged {H}. {His} {rel} sighed and gave {him} {prov} for the road.",
    "So {H} packed {prov} and set out at dawn.",
    "{H} did not wait a single day. {He} put on {his} shoes and set out {need}.",
    "\"Who will go {need}?\" cried {his} {rel}. \"I will,\" said {H}, and {he} set out that very morning.",
)
JOURNEYS = (
    "{He} walked for {n} days and {n} nights through {jplace}.",
    "The road led over {jplace}, and the wind was cold.",
    "After a long while {he} came to {jplace}, where {sight}.",
    "{He} crossed {jplace} and then {jplace2}, and {his} shoes were worn through.",
    "{H} went on and on, through {jplace}, until {he} was very tired.",
)
TROUBLES = (  # (how the helper is found, the good deed the hero does)
    ("There {he} saw a {aadj} {ak} caught in a hunter's snare.",
     "{H} knelt down and carefully opened the snare."),
    ("By the roadside sat a {aadj} {ak}, who was weeping bitterly.",
     "{H} sat down beside {ahim} and listened until the tears stopped."),
    ("Soon {H} met a {aadj} {ak} who looked very hungry.",
     "{H} broke {his} bread in two and gave half to the {ak}."),
    ("In the mud lay a {aadj} {ak} that could not get out.",
     "{H} pulled the {ak} out of the mud and wiped {ahis} face clean."),
    ("Under a bush {he} found a {aadj} {ak}, shivering with cold.",
     "{H} took off {his} cloak and wrapped it around the {ak}."),
    ("A {aadj} {ak} came limping along with a thorn in {ahis} foot.", "{H} gently pulled out the thorn."),
)
ASKS = (
    "\"Where are you going?\" asked the {ak}.",
    "\"Good day,\" said the {ak}. \"Where are you going in such a hurry?\"",
    "\"Who are you, and what do you seek here?\" asked the {ak}.",
    "The {ak} looked up at {H}. \"Why do you walk so far from home?\" {ahe} asked.",
)
ANSWERS = (
    "\"I am going to {goal} {need},\" answered {H}.",
    "\"I must go to {goal},\" said {H}, \"{need}.\"",
    "\"I seek the {obj},\" said {H}. \"Do you know the way?\"",
    "{H} told the {ak} everything, from the beginning to the end.",
)
THANKS = (
    "\"Because you were kind to me, I will help you,\" said the {ak}. "
    "\"Take {gift}. When you are in need, {use}.\"",
    "The {ak} gave {H} {gift} and said, \"{advice}\"",
    "\"Thank you,\" said the {ak}, and gave {H} {gift}. \"Follow the {trail}, and it will lead you to {goal}.\"",
    "The {ak} pressed {gift} into {his} hand. "
    "\"You have a good heart,\" {ahe} said. \"Remember this: {advice_lc}\"",
)
USES = ("throw it on the ground", "blow on it three times", "hold it up high", "call my name",
        "put it under your tongue")
ADVICE = ("Do not eat or drink anything the {vkind} offers you.",
          "Never look back, whatever you hear behind you.", "Speak the truth, and you will come to no harm.",
          "Wait until the {vkind} falls asleep at midnight.", "Do not open the third door, whatever happens.")
TRAILS = ("red stream", "flight of the white birds", "path of white pebbles", "evening star",
          "sound of the distant bells", "old stone wall")
ARRIVALS = (
    "At last {H} came to {goal}.",
    "On the {nth} day {H} reached {goal}, and {his} heart beat fast.",
    "When the sun went down, {H} saw {goal} rising before {him}.",
)
ENDINGS = (
    "And they lived happily ever after.",
    "And if they have not died, they are living still.",
    "From that day on, {H} never went hungry again, and the {ak} came to visit every spring.",
    "There was a great feast, and everyone danced until morning.",
    "So kindness was rewarded, and the {vkind} was never seen again.",
    "And to this day, people in that land say: \"{proverb}\"",
    "{H} grew old and wise, and told this story to {his} grandchildren.",
    "And the {ak} and {H} stayed friends for the rest of their days.",
    "Snip, snap, snout, this tale is told out.",
)
ORDINALS = ("third", "fifth", "seventh", "ninth", "twelfth")
TASKS = ("sort a sack of millet from the ashes", "empty the lake with a sieve",
         "spin a room full of straw into gold", "build a bridge of feathers", "count every star in the sky",
         "cut down the whole forest with a glass axe")
_AN = re.compile(r"\b([Aa]) (?=[aeiou])")


def _cap(s: str) -> str:
    return s[0].upper() + s[1:]


def _person(ctx: dict, prefix: str, gender: str) -> None:
    """Set pronoun keys: prefix "a" gives ahe/ahim/ahis/aHe/aHis, "" gives he/him/his/He/His."""
    he, him, his = PRONOUNS[gender]
    ctx.update({prefix + "he": he, prefix + "him": him, prefix + "his": his,
                prefix + "He": _cap(he), prefix + "His": _cap(his)})


def _confront(rng: random.Random, f, ctx: dict) -> list[str]:
    """The scene at the villain's home, as a list of sentences."""
    c = rng.choice
    kind = rng.randrange(4)
    if kind == 0:  # a riddle
        question, ctx["answer"] = c(RIDDLES)
        out = [f("\"Who dares to come here?\" roared the {vkind}."),
               f(c(("\"Only a poor {hkind},\" said {H}.", "\"It is I, {H},\" said the {hkind}.")))]
        return out[:2 * rng.randrange(2)] + [
            f("\"Answer my riddle, or you shall never leave,\" said {V}. \"") + question + '"',
            f(c(("{H} thought for a long time. \"{answer},\" {he} said at last.",
                 "{H} remembered the words of the {ak} and said, \"{answer}.\""))),
            f(c(("The {vkind} shrieked with rage and vanished in a puff of black smoke.",
                 "At that the {vkind} burst into a thousand pieces.",
                 "{V} was so angry that {vhe} stamped a hole in the floor and fell through it."))),
            f(c(("{H} took the {obj} and left that place.", "The {obj} lay there, and {H} took it.")))]
    if kind == 1:  # steal in at night, flee, use the helper's gift
        ctx["effect"] = f(c(GIFT_EFFECTS))
        return [f("{H} waited until midnight, when the {vkind} fell asleep, and crept in on tiptoe."),
                f(c(("{He} took the {obj} from under {V}'s pillow.",
                     "{He} found the {obj} in an iron chest and lifted it out."))),
                f("But the {vkind} woke up and chased after {him}, roaring like a storm."),
                f("Then {H} remembered the gift of the {ak} and threw down {gift}, and {effect}."),
                f(c(("So {H} escaped.", "The {vkind} could not follow, and {H} was free.")))]
    if kind == 2:  # three impossible tasks
        out = [f("\"If you want the {obj},\" said {V}, \"you must do three tasks for me.\"")]
        for i, task in enumerate(rng.sample(TASKS, 3)):
            ctx.update(task=task, First=("First", "Next", "Last")[i], first=("first", "second", "third")[i])
            out.append(f(c(("{First}, {H} had to {task} before morning.",
                            "For the {first} task, the {vkind} told {him} to {task}."))))
            if i == 0:
                out.append(f("{H} sat down and wept, but the {ak} came in the night and helped {him}."))
        return out + [f(c(("When all three tasks were done, the {vkind} had to give up the {obj}.",
                           "{V} could not believe it, and in {vhis} anger {vhe} turned to stone.")))]
    return [f("\"Give me the {obj},\" said {H} bravely."),
            f("The {vkind} laughed. \"I can turn into anything I like,\" {vhe} boasted."),
            f("\"Surely not into something as small as a mouse,\" said {H}."),
            f(c(("At once {V} turned into a mouse, and {H} caught {vhim} under {his} hat.",
                 "At once {V} turned into a mouse, and the {ak} chased {vhim} away for ever."))),
            f("Then {H} picked up the {obj}, which lay on a table of {metal}.")]


def _tale(rng: random.Random) -> str:
    """One tale: paragraphs for the beginning, each helper, the confrontation and the end."""
    c = rng.choice
    hkind, hg = c(HERO_KINDS)
    (rel, rg), (vic, vg), (vkind, villain_g) = c(RELATIVES), c(VICTIMS), c(VILLAIN_KINDS)
    ctx = dict(H=c(FEMALE_NAMES if hg == "f" else MALE_NAMES), hkind=hkind, hadj=c(HERO_ADJS),
               home=c(HOMES), rel=rel, rhe=PRONOUNS[rg][0], vic=vic, vichim=PRONOUNS[vg][1],
               vkind=vkind, vadj=c(VILLAIN_ADJS), V=c(VILLAIN_NAMES[villain_g]), goal=c(GOALS),
               obj=c(OBJECTS), prov=c(PROVISIONS), proverb=c(PROVERBS), n=c(NUMBERS),
               nth=c(ORDINALS), metal=c(("gold", "silver", "oak", "marble")),
               weak=c(("young", "small", "weak", "poor", "tired")))
    _person(ctx, "", hg)
    _person(ctx, "v", villain_g)
    ctx["t1"], ctx["t2"], ctx["t3"] = rng.sample(TRAITS, 3)

    def f(template: str) -> str:
        return template.format_map(ctx)

    problem, need, fix = c(PROBLEMS)
    ctx["need"] = f(need)
    begin = [f(c(OPENINGS))] + [f(d) for d in rng.sample(DESCRIPTIONS, rng.randrange(3))]
    begin.append(f(problem))
    if rng.random() < 0.75:
        begin.append(f(c(DECISIONS)))
    paragraphs = [" ".join(begin)]

    journeys = rng.sample(JOURNEYS, 3)
    for i, (ak, ag) in enumerate(rng.sample(HELPER_KINDS, c((1, 1, 1, 1, 2, 3)))):
        ctx["jplace"], ctx["jplace2"] = rng.sample(JOURNEY_PLACES, 2)
        ctx.update(sight=c(SIGHTS), ak=ak, aadj=c(HELPER_ADJS), gift=c(GIFTS), use=c(USES),
                   trail=c(TRAILS))
        _person(ctx, "a", ag)
        ctx["advice"] = f(c(ADVICE))
        ctx["advice_lc"] = ctx["advice"][0].lower() + ctx["advice"][1:]
        trouble, kindness = c(TROUBLES)
        scene = [f(journeys[i]), f(trouble), f(kindness)]
        if rng.random() < (0.6 if i == 0 else 0.3):  # a short talk, before or after the good deed
            at = c((2, 3))
            scene[at:at] = [f(c(ASKS)), f(c(ANSWERS))]
        paragraphs.append(" ".join(scene + [f(c(THANKS))]))

    arrive = [f(c(ARRIVALS))]
    if "{V}" not in problem:  # the villain has not been introduced yet
        arrive.append(f(c(("There lived a {vadj} {vkind} named {V}, who guarded the {obj} day and night.",
                           "The {obj} belonged to a {vadj} {vkind} called {V}, "
                           "who never let it out of {vhis} sight."))))
    paragraphs.append(" ".join(arrive + _confront(rng, f, ctx)))
    end = [f(c(("{H} hurried home as fast as {his} legs could carry {him}.",
                "{H} went home, and the {ak} showed {him} the shortest way.",
                "{H} walked back along the same long road, singing all the way.")))]
    end = end[:rng.randrange(2)] + [f(fix)]
    if rng.random() < 0.4:
        end.append(f(c(("The king heard of it and gave {H} half of his kingdom.",
                        "The whole village came out to greet {him}, ringing every bell.",
                        "{His} {rel} hugged {him} and would not let go."))))
    paragraphs.append(" ".join(end + [f(c(ENDINGS))]))
    return _AN.sub(r"\1n ", "\n".join(paragraphs))  # "a old" -> "an old"


def iter_fairy_tales(seed: int = 0) -> Iterator[str]:
    """Endless stream of tales, each a str; the same seed gives the same stream.

    Each tale is a few paragraphs separated by single newlines (never a blank
    line). All randomness comes from ``random.Random(seed)``.
    """
    rng = random.Random(seed)
    while True:
        yield _tale(rng)


def generate_fairy_tales(num_bytes: int = 4_000_000, seed: int = 0) -> str:
    """Return tales separated by a blank line, between 0.9 and 1.0 times num_bytes long.

    Tales from ``iter_fairy_tales(seed)`` are joined with "\\n\\n" in order until
    the next one would make the text longer than ``num_bytes`` (UTF-8 bytes; the
    text is pure ASCII, so bytes equal characters). If the text is then still
    shorter than ``0.9 * num_bytes``, which only happens for small requests,
    that tale is skipped and later, shorter ones are tried (at most 200 of them).
    So the text is never longer than ``num_bytes``, always at least
    ``0.9 * num_bytes`` long for ``num_bytes >= 20_000`` (tales are roughly
    1,000-2,700 characters), empty when num_bytes is below about 1,000, and
    starts and ends with a whole tale. The same arguments always give the same text.
    """
    if num_bytes < 0:
        raise ValueError(f"num_bytes must be >= 0, got {num_bytes}")
    tales: list[str] = []
    size = 0  # length of the tales joined by blank lines
    misses = 0
    for tale in iter_fairy_tales(seed):
        extra = len(tale) + (2 if tales else 0)
        if size + extra <= num_bytes:
            tales.append(tale)
            size += extra
        elif size >= 0.9 * num_bytes or misses == 200:
            break
        else:
            misses += 1
    return "\n\n".join(tales)
