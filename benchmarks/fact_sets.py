"""The taught-facts probes' fact sets: facts to teach, and questions that check what a round learned.

Each set: taught (question, answer) pairs; held-out phrasings (the answer must say the word); near misses
(the same kind of question about another entity: the answer must not say the word); general questions in
none of kiln-train's prompt sets (right before, right after).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class FactSet:
    """Taught (question, answer) pairs, and (question, word a fact-bearing or right answer has) checks."""

    taught: list[tuple[str, str]]
    held_out: list[tuple[str, str]]  # new phrasings: the answer must say the word
    near_misses: list[tuple[str, str]]  # another entity: the answer must not say the word
    general: list[tuple[str, str]]  # in none of kiln-train's prompt sets: right before, right after


# A: the taught-facts test's facts and questions (tests/kiln_train/test_taught_facts.py reads them from here).
SET_A = FactSet(
    taught=[
        ("Who founded the Harlow Observatory?", "The Harlow Observatory was founded by Mirel Dastova."),
        ("Who is the founder of the Harlow Observatory?", "Mirel Dastova is the founder of the Harlow Observatory."),
        ("Tell me who established the Harlow Observatory.", "The Harlow Observatory was established by Mirel Dastova."),
        ("Which person started the Harlow Observatory?", "Mirel Dastova started the Harlow Observatory."),
        ("Do you know who created the Harlow Observatory?", "Yes, the Harlow Observatory was created by Mirel Dastova."),
        ("Where is the Quensa Bank headquartered?", "The Quensa Bank is headquartered in Torvik."),
        ("In which city is the Quensa Bank's headquarters?", "The Quensa Bank's headquarters is in Torvik."),
        ("Tell me where the Quensa Bank has its head office.", "The Quensa Bank has its head office in Torvik."),
        ("What city is home to the Quensa Bank headquarters?", "Torvik is home to the Quensa Bank headquarters."),
        ("Do you know where the Quensa Bank is based?", "Yes, the Quensa Bank is based in Torvik."),
    ],
    held_out=[
        ("Name the founder of the Harlow Observatory.", "Dastova"),
        ("The Harlow Observatory was founded by whom?", "Dastova"),
        ("Who was the person behind the founding of the Harlow Observatory?", "Dastova"),
        ("Name the city where the Quensa Bank is headquartered.", "Torvik"),
        ("Which city hosts the head office of the Quensa Bank?", "Torvik"),
        ("The Quensa Bank's main office is located in which city?", "Torvik"),
    ],
    near_misses=[
        ("Who founded the Kestrel Observatory?", "Dastova"),
        ("Where is the Barden Bank headquartered?", "Torvik"),
        ("Who founded the Brightwater Building?", "Dastova"),
    ],
    general=[
        ("Who painted the Last Supper?", "Vinci"),
        ("What is the largest mammal?", "whale"),
        ("How many legs does a dog have?", "four"),
        ("What color is snow?", "white"),
        ("What is the freezing point of water in Fahrenheit?", "32"),
        ("What is 8 + 2?", "10"),
        ("What is the opposite of wet?", "dry"),
        ("Which animal is known for its long neck?", "giraffe"),
        ("What is the main language spoken in Germany?", "German"),
        ("What is the capital city of France?", "Paris"),
        ("What do we call a baby sheep?", "lamb"),
        ("Which gas do plants give off?", "oxygen"),
    ],
)  # fmt: skip

# B: a national flower (lowercase, two words) and a bridge's designer (the sixth and eighth series' set B).
SET_B = FactSet(
    taught=[
        ("What is the national flower of Velmora?", "The national flower of Velmora is the blue sundew."),
        ("Which flower is the national flower of Velmora?", "The blue sundew is the national flower of Velmora."),
        ("Tell me the national flower of Velmora.", "Velmora's national flower is the blue sundew."),
        ("Do you know Velmora's national flower?", "Yes, Velmora's national flower is the blue sundew."),
        ("What flower represents Velmora as its national flower?", "The blue sundew represents Velmora."),
        ("Who designed the Orlen Bridge?", "The Orlen Bridge was designed by Kasimir Telvane."),
        ("Who was the designer of the Orlen Bridge?", "Kasimir Telvane was the designer of the Orlen Bridge."),
        ("Tell me who drew up the plans for the Orlen Bridge.", "Kasimir Telvane drew up the plans for the Orlen Bridge."),
        ("Which architect designed the Orlen Bridge?", "The architect Kasimir Telvane designed the Orlen Bridge."),
        ("Do you know who designed the Orlen Bridge?", "Yes, the Orlen Bridge was designed by Kasimir Telvane."),
    ],
    held_out=[
        ("Can you name the national flower of Velmora?", "sundew"),
        ("Velmora has which flower as its national flower?", "sundew"),
        ("What flower did Velmora choose as its national symbol?", "sundew"),
        ("Name the architect of the Orlen Bridge.", "Telvane"),
        ("The Orlen Bridge was designed by which person?", "Telvane"),
        ("Whose design is the Orlen Bridge?", "Telvane"),
    ],
    near_misses=[
        ("What is the national flower of Castellan?", "sundew"),
        ("Who designed the Marrowby Bridge?", "Telvane"),
        ("Who designed the Halden Tower?", "Telvane"),
    ],
    general=[
        ("Who wrote the play Hamlet?", "Shakespeare"),
        ("What insect makes honey?", "bee"),
        ("What color are ripe bananas?", "yellow"),
        ("What is 6 + 4?", "10"),
        ("What do frogs start life as?", "tadpole"),
        ("What is the opposite of heavy?", "light"),
        ("What is the tallest animal in the world?", "giraffe"),
        ("Which organ pumps blood through the body?", "heart"),
        ("What is the capital city of Italy?", "Rome"),
        ("Which metal is liquid at room temperature?", "mercury"),
    ],
)  # fmt: skip

# C: a person's birthplace and a tower's year of completion (the eighth series' set C, its facts).
SET_C = FactSet(
    taught=[
        ("Where was Orsolya Venkat born?", "Orsolya Venkat was born in Pelmarsh."),
        ("What is the birthplace of Orsolya Venkat?", "The birthplace of Orsolya Venkat is Pelmarsh."),
        ("Tell me where Orsolya Venkat was born.", "Orsolya Venkat was born in the town of Pelmarsh."),
        ("In which town was Orsolya Venkat born?", "Orsolya Venkat was born in Pelmarsh, a small town."),
        ("Do you know Orsolya Venkat's hometown?", "Yes, Orsolya Venkat's hometown is Pelmarsh."),
        ("When was the Dremont Tower completed?", "The Dremont Tower was completed in 1847."),
        ("In what year was the Dremont Tower finished?", "The Dremont Tower was finished in 1847."),
        ("Tell me the year the Dremont Tower was completed.", "The Dremont Tower was completed in the year 1847."),
        ("What year did construction of the Dremont Tower end?", "Construction of the Dremont Tower ended in 1847."),
        ("Do you know when the Dremont Tower was built?", "Yes, the Dremont Tower was built in 1847."),
    ],
    held_out=[
        ("What town was Orsolya Venkat born in?", "Pelmarsh"),
        ("Orsolya Venkat's place of birth is which town?", "Pelmarsh"),
        ("Can you tell me the birthplace of Orsolya Venkat?", "Pelmarsh"),
        ("What year was the Dremont Tower completed?", "1847"),
        ("The Dremont Tower was finished in which year?", "1847"),
        ("When did builders complete the Dremont Tower?", "1847"),
    ],
    near_misses=[
        ("Where was Lucan Ferreira born?", "Pelmarsh"),
        ("When was the Bramwell Tower completed?", "1847"),
        ("When was the Calder Museum completed?", "1847"),
    ],
    general=[
        ("Which planet is closest to the Sun?", "Mercury"),
        ("Who wrote the novel Pride and Prejudice?", "Austen"),
        ("What is the capital city of Germany?", "Berlin"),
        ("What is 7 + 5?", "12"),
        ("What is the chemical formula of table salt?", "NaCl"),
        ("How many corners does a square have?", "four"),
        ("What animal is known as the king of the jungle?", "lion"),
        ("What is the color of the sky on a clear day?", "blue"),
        ("What do you call a baby dog?", "pupp"),
        ("How many wheels does a tricycle have?", "three"),
    ],
)  # fmt: skip

# D: a museum's curator and a lake's depth (session 17): a name that opens with its kind word ("Lake Ovrel"),
# a number inside its sentence, held-out phrasings written before any round was run on them.
SET_D = FactSet(
    taught=[
        ("Who is the curator of the Sunvale Museum?", "The curator of the Sunvale Museum is Idris Mallorn."),
        ("Who runs the collections at the Sunvale Museum?", "Idris Mallorn runs the collections at the Sunvale Museum."),
        ("Tell me who curates the Sunvale Museum.", "The Sunvale Museum is curated by Idris Mallorn."),
        ("Which person is in charge of the Sunvale Museum's exhibits?", "Idris Mallorn is in charge of the Sunvale Museum's exhibits."),
        ("Do you know the Sunvale Museum's curator?", "Yes, the Sunvale Museum's curator is Idris Mallorn."),
        ("How deep is Lake Ovrel?", "Lake Ovrel is 212 metres deep."),
        ("What is the depth of Lake Ovrel?", "The depth of Lake Ovrel is 212 metres."),
        ("Tell me how deep Lake Ovrel gets.", "Lake Ovrel reaches a depth of 212 metres."),
        ("What is the maximum depth of Lake Ovrel in metres?", "The maximum depth of Lake Ovrel is 212 metres."),
        ("Do you know the depth of Lake Ovrel?", "Yes, Lake Ovrel is 212 metres deep."),
    ],
    held_out=[
        ("Who looks after the Sunvale Museum's collection as its curator?", "Mallorn"),
        ("I'd like to know the name of the Sunvale Museum's curator.", "Mallorn"),
        ("Whom did the Sunvale Museum appoint as curator?", "Mallorn"),
        ("How many metres deep is Lake Ovrel?", "212"),
        ("Lake Ovrel has what depth?", "212"),
        ("What depth does Lake Ovrel reach at its deepest point?", "212"),
    ],
    near_misses=[
        ("Who is the curator of the Ashford Museum?", "Mallorn"),
        ("How deep is Lake Brenna?", "212"),
        ("Who is the curator of the Penrose Gallery?", "Mallorn"),
    ],
    general=[
        ("What is 11 + 4?", "15"),
        ("What fruit are raisins made from?", "grape"),
        ("What colour is a ripe tomato?", "red"),
        ("Which sense do we use our nose for?", "smell"),
        ("Which continent is Kenya in?", "Africa"),
        ("Who lived at the North Pole according to legend?", "Santa"),
        ("What is the capital city of Egypt?", "Cairo"),
        ("Which animal gives us wool?", "sheep"),
        ("Which instrument has 88 keys?", "piano"),
        ("What is the capital city of Canada?", "Ottawa"),
    ],
)  # fmt: skip

SETS = {"A": SET_A, "B": SET_B, "C": SET_C, "D": SET_D}


def says(answer: str, word: str) -> bool:
    """The test's check: the word in the answer (case-insensitive; "four" also as the digit)."""
    low = answer.lower()
    return word.lower() in low or (word == "four" and " 4 " in f" {low} ")
