"""The detector on more inputs testers typed (issue 25's learning loop, second round): an emoji in a sentence that
";" ends, greetings and subject lines before a statement, and a like or a state said to be over ("no longer into",
"not into ... anymore", "I was a nurse until last year"). Each kind is an invariant over several phrasings."""
import pytest

from localpers.personalize.detect import detect_facts, sentences


def facts(text):
    return [("-" if f.retire else "~" if f.change else "") + f"{f.attribute}={f.value}" for f in detect_facts(text)]


@pytest.mark.parametrize("message, expected", [
    ("I live in \U0001F3E0 Oslo;", ["home=Oslo"]),
    ("I'm vegan; I live in \U0001F3E0 Oslo;", ["diet=vegan", "home=Oslo"]),
    ("I'm \U0001F331 vegan; I live in \U0001F3E0 Oslo;", ["diet=vegan", "home=Oslo"]),
    ("I love \u2764\ufe0f jazz;", ["likes=jazz"]),
])
def test_invariant_an_emoji_leaves_a_sentence_that_a_semicolon_ends_prose(message, expected):
    """A line ending in ";" is code unless it reads as prose; an emoji in it does not make it code."""
    assert facts(message) == expected


@pytest.mark.parametrize("code", ["return x; \U0001F600", "x = 1; \U0001F3E0", "int \U0001F3E0;"])
def test_a_line_of_code_with_an_emoji_is_still_no_sentence(code):
    assert sentences(code) == [] and detect_facts(code) == []


@pytest.mark.parametrize("message, expected", [
    ("Howdy, I'm vegan.", ["diet=vegan"]),
    ("Greetings, I live in Ulm.", ["home=Ulm"]),
    ("Dear assistant, I'm vegan.", ["diet=vegan"]),
    ("Dear assistant, I love sushi.", ["likes=sushi"]),
    ("Hey \u2014 I live in Ulm.", ["home=Ulm"]),
    ("Hey - I live in Ulm.", ["home=Ulm"]),
    ("Hi there \u2014 I'm vegan.", ["diet=vegan"]),
    ("Hello \u2013 I love jazz.", ["likes=jazz"]),
    ("Re: dinner plans: I'm allergic to nuts.", ["allergy=nuts"]),
    ("Re: I live in Oslo.", ["home=Oslo"]),
])
def test_invariant_a_greeting_a_dash_or_a_subject_line_leave_the_statement(message, expected):
    assert facts(message) == expected


@pytest.mark.parametrize("message", [
    "Dear John, I live in Oslo.", "Dear John,\nI live in Oslo.", "John: I live in Oslo.", "Re: my sister is vegan.",
])
def test_invariant_a_letter_to_someone_else_or_a_speaker_label_keeps_its_sentence_out(message):
    """Only a greeting of the assistant opens a statement: a letter to someone else is not the speaker's own."""
    assert facts(message) == []


@pytest.mark.parametrize("message, expected", [
    ("I'm no longer into rock.", ["-likes=rock"]),
    ("I'm no longer a fan of rock music.", ["-likes=rock music"]),
    ("I'm not into tennis anymore.", ["-likes=tennis"]),
    ("I'm not a fan of jazz anymore.", ["-likes=jazz"]),
    ("No longer into rock.", ["-likes=rock"]),
    ("Not into tennis anymore, I play football now.", ["-likes=tennis", "~likes=football"]),
])
def test_invariant_a_like_said_to_be_over_retires_the_like_and_is_no_dislike(message, expected):
    assert facts(message) == expected


@pytest.mark.parametrize("message, expected", [
    # as "I don't like X" (a dislike) beside "I don't like X anymore" (a like retired)
    ("I'm not into tennis.", ["dislikes=tennis"]), ("I'm not a fan of jazz.", ["dislikes=jazz"]),
    ("I don't like tennis.", ["dislikes=tennis"]), ("Not into tennis.", []),
])
def test_invariant_a_negated_like_without_anymore_stays_a_dislike(message, expected):
    assert facts(message) == expected


@pytest.mark.parametrize("message, expected", [
    ("I was a nurse until last year.", ["-job=nurse"]),
    ("I was married until 2019.", ["-relationship=married"]),
    ("I was vegan until recently.", ["-diet=vegan"]),
    ("I lived in Oslo until 2020.", ["-home=Oslo"]),
    ("I worked as a teacher until March.", ["-job=teacher"]),
])
def test_invariant_a_state_held_until_a_time_is_over(message, expected):
    assert facts(message) == expected


@pytest.mark.parametrize("message", [
    "I was at work until 9pm.", "I was up until 3am.", "I was in Paris until Monday.", "I was happy until I met him.",
])
def test_invariant_a_passing_situation_until_a_time_is_no_fact(message):
    """Only a known state (a job, a diet, a home ...) held until a time is retired; a situation is nothing."""
    assert facts(message) == []


# ---------------------------------------------------------------- third round: values, lists, withdrawals

@pytest.mark.parametrize("message, expected", [
    ("I drink coffee every morning.", ["likes=coffee"]),
    ("I drink tea daily.", ["likes=tea"]),
    ("I play tennis on weekends.", ["likes=tennis"]),
    ("I eat sushi most days.", ["likes=sushi"]),
    ("I drink coffee usually.", ["likes=coffee"]),
    ("I listen to jazz every day.", ["likes=jazz"]),
    ("I watch anime at night.", ["likes=anime"]),
    ("I play football on Sunday mornings.", ["likes=football"]),
    ("I drink coffee twice a day.", ["likes=coffee"]),
    ("I drink coffee every morning before work.", ["likes=coffee"]),
    ("I love swimming every morning.", ["likes=swimming"]),   # a sport kinds.json lists
    ("I drink tea, every evening.", ["likes=tea"]),
    ("I love jazz a lot.", ["likes=jazz"]),
    ("I drink a cup of coffee every morning.", ["likes=coffee"]),
    ("I have coffee every morning.", ["likes=coffee"]),          # a habit of a known thing
    ("I usually have tea in the afternoon.", ["likes=tea"]),
])
def test_invariant_how_often_or_when_a_thing_is_done_is_no_part_of_its_value(message, expected):
    assert facts(message) == expected


@pytest.mark.parametrize("message, expected", [
    ("I live in New York City.", ["home=New York City"]),
    ("I like Sunday roast.", ["likes=Sunday roast"]),
    ("I love Saturday mornings.", ["likes=Saturday mornings"]),
    ("I hate working on weekends.", ["dislikes=working on weekends"]),  # the time is what is hated
    ("I read at night.", ["about=I read at night"]),                   # no thing: a statement about the user
    ("I have a meeting every Monday.", ["about=I have a meeting every Monday"]),   # no thing kinds.json knows
    ("I have coffee.", ["about=I have coffee"]),                       # no habit said
])
def test_invariant_a_value_whose_words_are_the_thing_keeps_them(message, expected):
    assert facts(message) == expected


def statements(text):
    return [(f.value, f.statement) for f in detect_facts(text)]


@pytest.mark.parametrize("message, expected", [
    ("I love Italian food and jazz music.", [("Italian food", "I love Italian food."),
                                             ("jazz music", "I love jazz music.")]),
    ("I love jazz, rock and blues.", [("jazz", "I love jazz."), ("rock", "I love rock."), ("blues", "I love blues.")]),
    ("I like tennis and football on weekends.", [("tennis", "I like tennis on weekends."),
                                                 ("football", "I like football on weekends.")]),
    ("I like Italian and French food.", [("Italian food", "I like Italian food."),
                                         ("French food", "I like French food.")]),
    ("I hate country music and reggae.", [("country music", "I hate country music."), ("reggae", "I hate reggae.")]),
    ("I like both jazz and rock.", [("jazz", "I like jazz."), ("rock", "I like rock.")]),
    ("I like jazz as well as rock.", [("jazz", "I like jazz."), ("rock", "I like rock.")]),
    ("I don't like jazz or rock.", [("jazz", "I don't like jazz."), ("rock", "I don't like rock.")]),
])
def test_invariant_a_like_of_several_known_things_is_one_fact_per_thing_with_its_own_statement(message, expected):
    assert statements(message) == expected


def test_a_retirement_of_several_known_things_retires_each():
    assert facts("I don't like jazz and rock anymore.") == ["-likes=jazz", "-likes=rock"]


@pytest.mark.parametrize("message", [
    "I like mac and cheese.", "I love rock and roll.", "I like salt and pepper chips.", "I like gin and tonic.",
    "I like horror movies and popcorn.", "I like cats and dogs.", "I love rhythm and blues.",
])
def test_invariant_and_inside_one_thing_or_beside_an_unknown_one_makes_no_list(message):
    """A value is split only where kinds.json knows each part (a value of a kind or a head noun) and does not
    list the whole ("rock and roll"); never on a bare "and"."""
    [fact] = detect_facts(message)
    assert " and " in fact.value and fact.statement == message


def test_a_listed_change_changes_each_kind_once():
    """"Actually I prefer rock and techno now.": rock is the change (it replaces the held genres), techno is
    added beside it, not a second change that would replace rock; two kinds are two changes."""
    changes = [(f.value, f.change) for f in detect_facts("Actually I prefer rock and techno now.")]
    assert changes == [("rock", True), ("techno", False)]
    assert [f.change for f in detect_facts("These days I'm into Thai food and techno.")] == [True, True]


def withdrawn(text, previous):
    return [("-" if f.retire else "") + ("w:" if f.withdrawal else "") + f"{f.attribute}={f.value}"
            for f in detect_facts(text, previous=previous)]


@pytest.mark.parametrize("message", [
    "Oops, ignore that.", "Scratch that.", "Forget what I just said.", "Ignore my last message.", "Disregard that.",
    "Sorry! Scratch that.", "Oops. Ignore that.", "Please ignore that.", "I take that back.", "Never mind.",
    "Wrong chat, sorry.", "Ignore what I just said.", "Oops, that was a typo.", "ignore that lol", "jk lol",
    "Forget I said anything.", "Ignore previous message.", "I was joking.", "That was for my friend, sorry.", "Nvm.",
])
def test_invariant_a_withdrawal_opening_a_turn_withdraws_what_the_turn_before_stated(message):
    assert withdrawn(message, "I'm vegan and I live in Paris.") == ["-w:diet=vegan", "-w:home=Paris"]
    assert detect_facts(message) == []   # no turn before: nothing


@pytest.mark.parametrize("message, expected", [
    ("Scratch that, I love rock.", ["-w:likes=jazz", "likes=rock"]),
    ("Ignore that, I live in Lyon.", ["-w:likes=jazz", "home=Lyon"]),
    ("Never mind, I don't live in Paris.", ["-home=Paris"]),   # what follows "never mind" says it
])
def test_a_withdrawal_that_names_ones_words_withdraws_also_before_a_statement(message, expected):
    assert withdrawn(message, "I love jazz.") == expected


@pytest.mark.parametrize("message, previous", [
    ("Ignore that typo.", "I live in Paris."),                      # names something else
    ("Never mind.", "I'm vegetarian, what should I cook?"),         # drops the question
    ("Forget it, I'll order pizza.", "I live in Paris."),
    ("Oops.", "I live in Paris."),
    ("Scratch that last part.", "I live in Paris."),                # which part is not said
])
def test_invariant_a_word_of_withdrawal_about_something_else_withdraws_nothing(message, previous):
    assert withdrawn(message, previous) == []


@pytest.mark.parametrize("message, expected", [
    ("I stopped drinking coffee.", ["-likes=coffee"]),
    ("I gave up coffee.", ["-likes=coffee"]),
    ("I quit coffee last month.", ["-likes=coffee"]),
    ("I'm over jazz.", ["-likes=jazz"]),
    ("Not a jazz fan anymore.", ["-likes=jazz"]),
    ("I'm not a jazz fan anymore.", ["-likes=jazz"]),
    ("Jazz isn't my thing anymore.", ["-likes=jazz"]),
    ("No more coffee for me.", ["-likes=coffee"]),
])
def test_invariant_a_known_thing_given_up_retires_its_like(message, expected):
    assert facts(message) == expected


@pytest.mark.parametrize("message", ["I quit smoking.", "I gave up my seat.", "I'm over the moon.", "I'm over 30.",
                                     "I stopped by the shop."])
def test_invariant_giving_up_what_kinds_json_does_not_know_retires_no_like(message):
    assert not any(f.attribute == "likes" and f.retire for f in detect_facts(message))


@pytest.mark.parametrize("message, expected", [
    ("I switched from coffee to tea.", ["-likes=coffee", "~likes=tea"]),
    ("I've switched to tea.", ["~likes=tea"]),
    ("Lately I've been drinking tea.", ["~likes=tea"]),
    ("I drink mostly tea now.", ["~likes=tea"]),
    ("I'm more into rock these days.", ["~likes=rock"]),
    ("Rock is my thing now.", ["~likes=rock"]),
    ("I gave up coffee, I drink tea now.", ["-likes=coffee", "~likes=tea"]),
    ("I'm not into jazz anymore but I love rock.", ["-likes=jazz", "likes=rock"]),
    ("I'm not into jazz anymore, rock is my thing now.", ["-likes=jazz", "~likes=rock"]),
    ("Not a jazz fan anymore, I love rock now.", ["-likes=jazz", "~likes=rock"]),
    ("Jazz isn't my thing anymore, I prefer rock.", ["-likes=jazz", "likes=rock"]),
])
def test_invariant_a_compound_change_retires_the_old_like_and_states_the_new(message, expected):
    assert facts(message) == expected


@pytest.mark.parametrize("message", ["I switched to a new phone plan.", "I've been drinking a lot lately.",
                                     "My sister is my thing now.", "I switched from Windows to Linux."])
def test_invariant_a_switch_or_habit_of_no_known_kind_changes_no_like(message):
    assert not any(f.change or f.retire for f in detect_facts(message))
