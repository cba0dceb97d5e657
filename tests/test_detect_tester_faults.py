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


# ---------------------------------------------------------------- fourth round: when and where, trades, lists

@pytest.mark.parametrize("message, expected", [
    ("I work at night.", ["about=I work at night"]),
    ("i work at night", ["about=I work at night"]),
    ("I work at home.", ["about=I work at home"]),
    ("I'm working at home.", []),                                   # an activity in progress: no about fact
    ("I work at weekends.", ["about=I work at weekends"]),
    ("I work at the weekend.", ["about=I work at the weekend"]),
    ("I work at odd hours.", ["about=I work at odd hours"]),
    ("I work at my desk.", ["about=I work at my desk"]),
    ("I work for a living.", ["about=I work for a living"]),
    ("I work for myself.", ["about=I work for myself"]),
    ("I work at Google", ["employer=Google"]),
    ("I work at the hospital.", ["employer=hospital"]),
    ("I work at a bakery.", ["employer=bakery"]),
    ("I work at Google at night.", ["employer=Google"]),
    ("I work at home for Google.", ["employer=Google"]),
    ("I work from home for Google.", ["employer=Google"]),
    ("I work nights at the hospital.", ["employer=hospital"]),
])
def test_invariant_when_or_where_one_works_is_no_employer(message, expected):
    assert facts(message) == expected


@pytest.mark.parametrize("message, expected", [
    ("I gave up tennis for golf.", ["-likes=tennis", "likes=golf"]),
    ("i gave up tennis for golf lol", ["-likes=tennis", "likes=golf"]),
    ("I gave up coffee for tea.", ["-likes=coffee", "likes=tea"]),
    ("I quit coffee for tea.", ["-likes=coffee", "likes=tea"]),
    ("I ditched tennis for golf", ["-likes=tennis", "likes=golf"]),
    ("I traded tennis for golf.", ["-likes=tennis", "likes=golf"]),
    ("I swapped coffee for green tea.", ["-likes=coffee", "likes=green tea"]),
    ("I replaced coffee with tea.", ["-likes=coffee", "likes=tea"]),
    ("I gave up tennis in favor of golf.", ["-likes=tennis", "likes=golf"]),
    ("I gave up tennis for golf now.", ["-likes=tennis", "~likes=golf"]),   # "now": a change, as always
])
def test_invariant_a_known_thing_given_up_for_another_retires_the_one_and_likes_the_other(message, expected):
    assert facts(message) == expected


@pytest.mark.parametrize("message", ["I gave up my seat for an old lady.", "I gave up coffee for Lent.",
                                     "I traded my car for a bike."])
def test_invariant_a_trade_of_things_kinds_json_does_not_know_states_no_like(message):
    assert not any(f.attribute == "likes" for f in detect_facts(message))


@pytest.mark.parametrize("message, expected", [
    ("I love Italian food and also jazz music.", [("Italian food", "I love Italian food."),
                                                  ("jazz music", "I love jazz music.")]),
    ("I love Italian food, and also jazz music.", [("Italian food", "I love Italian food."),
                                                   ("jazz music", "I love jazz music.")]),
    ("I love jazz and also rock.", [("jazz", "I love jazz."), ("rock", "I love rock.")]),
    ("I love jazz and also like rock.", [("jazz", "I love jazz."), ("rock", "I also like rock.")]),
])
def test_invariant_also_before_a_thing_lists_it_and_starts_no_clause(message, expected):
    assert statements(message) == expected


@pytest.mark.parametrize("message, expected", [
    ("I'm vegan and also allergic to nuts.", ["diet=vegan", "allergy=nuts"]),
    ("I'm vegan and still allergic to nuts.", ["diet=vegan", "allergy=nuts"]),
    ("I'm a nurse and also live in Lyon.", ["job=nurse", "home=Lyon"]),
])
def test_invariant_also_before_a_predicate_still_starts_a_clause_of_the_speaker(message, expected):
    assert facts(message) == expected


@pytest.mark.parametrize("message, expected", [
    ("I love jazz music, Italian food, and hiking.", [("jazz music", "I love jazz music."),
                                                      ("Italian food", "I love Italian food."),
                                                      ("hiking", "I love hiking.")]),
    ("I love hiking, jazz and rock.", [("hiking", "I love hiking."), ("jazz", "I love jazz."),
                                       ("rock", "I love rock.")]),
    ("I like reading, writing and painting.", [("reading", "I like reading."), ("writing", "I like writing."),
                                               ("painting", "I like painting.")]),
    ("I hate mushrooms, olives and anchovies.", [("mushrooms", "I hate mushrooms."), ("olives", "I hate olives."),
                                                 ("anchovies", "I hate anchovies.")]),
    ("I like pizza, sushi, and mac and cheese.", [("pizza", "I like pizza."), ("sushi", "I like sushi."),
                                                  ("mac and cheese", "I like mac and cheese.")]),
    ("I like pizza, sushi and mac and cheese.", [("pizza", "I like pizza."), ("sushi", "I like sushi."),
                                                 ("mac and cheese", "I like mac and cheese.")]),
    ("I like pizza, mac and cheese.", [("pizza", "I like pizza."), ("mac and cheese", "I like mac and cheese.")]),
    ("i love hiking, swimming and yoga", [("hiking", "I love hiking."), ("swimming", "I love swimming."),
                                          ("yoga", "I love yoga.")]),
    ("I love tea, jazz, and hiking every weekend.", [("tea", "I love tea every weekend."),
                                                     ("jazz", "I love jazz every weekend."),
                                                     # read as "I love hiking every weekend." alone reads
                                                     ("hiking every weekend", "I love hiking every weekend.")]),
])
def test_invariant_a_comma_list_ended_by_and_is_one_fact_per_thing_known_or_not(message, expected):
    assert statements(message) == expected


def test_a_comma_list_retired_retires_each_thing():
    assert facts("I don't like jazz, rock and hiking anymore.") == ["-likes=jazz", "-likes=rock", "-likes=hiking"]


@pytest.mark.parametrize("message, value", [
    ("I love jazz, especially bebop.", "jazz"),                     # no "and": a qualifier, no list
    ("I love cooking, especially Italian and French food.", "cooking"),
    ("I love Paris, it's beautiful.", "Paris"),
])
def test_invariant_a_comma_before_a_qualifier_makes_no_list(message, value):
    assert [f.value for f in detect_facts(message)] == [value]


# ---------------------------------------------------------------- fourth round: phrasings people type

@pytest.mark.parametrize("message", ["ignore that pls", "pls ignore that", "nvm that", "Actually no, ignore that.",
                                     "plz ignore that", "Nope, scratch that."])
def test_invariant_a_withdrawal_typed_casually_withdraws_the_turn_before(message):
    assert withdrawn(message, "I'm vegan and I live in Paris.") == ["-w:diet=vegan", "-w:home=Paris"]


@pytest.mark.parametrize("message, expected", [
    ("Ive switched to tea", ["~likes=tea"]),
    ("ive been vegan for years", ["diet=vegan"]),
    ("Gave up tennis for golf.", ["-likes=tennis", "likes=golf"]),
    ("Switched to tea.", ["~likes=tea"]),
    ("Stopped drinking coffee.", ["-likes=coffee"]),
    ("I'm off coffee now.", ["-likes=coffee"]),
    ("I'm done with coffee.", ["-likes=coffee"]),
    ("I work @ Google.", ["employer=Google"]),
    ("I listen to jazz while working.", ["likes=jazz"]),
    ("I drink coffee when I work.", ["likes=coffee"]),
    ("I gave up coffee for tea a year ago.", ["-likes=coffee", "likes=tea"]),
])
def test_invariant_a_typo_a_left_out_subject_or_a_circumstance_still_states_the_fact(message, expected):
    assert facts(message) == expected


def test_a_trade_said_with_a_time_keeps_the_time_out_of_the_new_likes_statement():
    assert statements("I gave up coffee for tea a year ago.") == [("coffee", "I no longer like coffee."),
                                                                   ("tea", "I like tea.")]


@pytest.mark.parametrize("message, expected", [
    ("I like Italian food and also hiking.", [("Italian food", "I like Italian food."), ("hiking", "I like hiking.")]),
    ("I enjoy hiking and also swimming.", [("hiking", "I enjoy hiking."), ("swimming", "I enjoy swimming.")]),
])
def test_invariant_and_also_lists_things_known_or_not(message, expected):
    assert statements(message) == expected


@pytest.mark.parametrize("message", ["Stopped by the shop.", "Quit complaining.", "I'm off work.",
                                     "I'm done with this.", "I love it when it rains."])
def test_invariant_the_new_readings_leave_other_sentences_without_a_like(message):
    assert not any(f.attribute == "likes" for f in detect_facts(message))


@pytest.mark.parametrize("message, expected", [
    ("I used to like jazz but now I prefer rock.", ["-likes=jazz", "~likes=rock"]),
    ("I used to drink coffee, now I drink tea.", ["-likes=coffee", "~likes=tea"]),
    ("I used to like jazz, these days I prefer rock.", ["-likes=jazz", "~likes=rock"]),
    ("I used to like jazz, nowadays I like rock.", ["-likes=jazz", "~likes=rock"]),
    ("I'm vegan and now I also like rock.", ["diet=vegan", "likes=rock"]),      # "also": an addition
])
def test_invariant_now_opening_a_later_clause_says_a_change_as_it_does_opening_the_sentence(message, expected):
    assert facts(message) == expected


@pytest.mark.parametrize("message, expected", [
    ("I'm a tea person.", ["likes=tea"]),
    ("I'm a coffee guy.", ["likes=coffee"]),
    ("im a huge coffee addict", ["likes=coffee"]),
    ("I'm more of a tea person now.", ["~likes=tea"]),
    ("I'm a morning person.", ["about=I'm a morning person"]),   # no thing kinds.json knows
    ("I love: jazz, rock and blues.", ["likes=jazz", "likes=rock", "likes=blues"]),
    ("Love jazz, rock and blues.", ["likes=jazz", "likes=rock", "likes=blues"]),
    ("Love it!", []),
    ("Love this place.", []),                                     # no thing kinds.json knows: no subject given
    ("Like I said, I'm vegan.", ["diet=vegan"]),
])
def test_invariant_a_known_thing_said_as_a_kind_of_person_or_without_a_subject_is_a_like(message, expected):
    assert facts(message) == expected


@pytest.mark.parametrize("message, expected", [
    ("im allergic to nuts, eggs and milk", ["allergy=nuts", "allergy=eggs", "allergy=milk"]),
    ("I'm allergic to peanuts and shellfish.", ["allergy=peanuts", "allergy=shellfish"]),
    ("I'm allergic to cats, dogs, and pollen.", ["allergy=cats", "allergy=dogs", "allergy=pollen"]),
    ("I have a peanut and tree nut allergy.", ["allergy=peanut", "allergy=tree nut"]),
    ("I'm not allergic to nuts and eggs anymore.", ["-allergy=nuts", "-allergy=eggs"]),
    ("I speak English, French and Spanish.", ["language=English", "language=French", "language=Spanish"]),
    ("I speak english and french", ["language=English", "language=French"]),
])
def test_invariant_a_list_of_allergies_or_languages_is_one_fact_per_item(message, expected):
    """Allergies and languages are several values each: every listed one is a fact, known to kinds.json or not
    (an allergy left out of a list is the costliest fact to lose)."""
    assert facts(message) == expected


@pytest.mark.parametrize("message, expected", [
    ("My favorite foods are pizza, sushi and tacos.", ["favourite foods=pizza, sushi and tacos"]),
    ("My hobbies are hiking, reading and cooking.", ["favourite hobbies=hiking, reading and cooking"]),
    ("My favorite food is pizza, with extra cheese.", ["favourite food=pizza"]),
])
def test_invariant_a_favourite_said_as_a_comma_list_keeps_the_list(message, expected):
    assert facts(message) == expected


@pytest.mark.parametrize("message, expected", [
    ("I gave up tennis and took up golf.", ["-likes=tennis", "likes=golf"]),
    ("I quit tennis and started golf.", ["-likes=tennis", "likes=golf"]),
    ("I stopped playing tennis and started playing golf.", ["-likes=tennis", "likes=golf"]),
    ("I gave up coffee and switched to tea.", ["-likes=coffee", "~likes=tea"]),
    ("I took up golf.", ["likes=golf"]),
    ("I took up knitting.", ["about=I took up knitting"]),
])
def test_invariant_a_like_taken_up_after_one_given_up_in_the_same_sentence_is_read(message, expected):
    assert facts(message) == expected


@pytest.mark.parametrize("message, expected", [
    ("I love Italian food and also I live in Oslo.", ["likes=Italian food", "home=Oslo"]),
    ("I'm vegan, plus I live in Oslo.", ["diet=vegan", "home=Oslo"]),
    ("I work at night and sleep during the day.", ["about=I work at night and sleep during the day"]),
    ("I'm allergic to bees, wasps etc.", ["allergy=bees", "allergy=wasps"]),
    ("I'm not a coffee person.", ["dislikes=coffee"]),
    ("I'm not a morning person.", ["about=I'm not a morning person"]),
])
def test_invariant_also_before_i_a_when_before_and_a_closing_etc_or_not_a_x_person_read_as_meant(message, expected):
    assert facts(message) == expected


@pytest.mark.parametrize("message, expected", [
    ("I'm allergic to nuts \U0001F95C, eggs \U0001F95A and milk \U0001F95B",
     ["allergy=nuts", "allergy=eggs", "allergy=milk"]),
    ("I love jazz \U0001F3B7, rock \U0001F3B8 and hiking", ["likes=jazz", "likes=rock", "likes=hiking"]),
    ("I love Italian food, also jazz music.", ["likes=Italian food", "likes=jazz music"]),
    ("I like Italian food, also hiking.", ["likes=Italian food", "likes=hiking"]),
    ("i work at nite", ["about=I work at nite"]),
])
def test_invariant_an_emoji_before_a_comma_or_also_after_one_keeps_the_list(message, expected):
    assert facts(message) == expected


@pytest.mark.parametrize("message, expected", [
    ("jazz isnt my thing anymore", ["-likes=jazz"]),
    ("I have a coffee every morning.", ["likes=coffee"]),
    ("I usually grab a coffee in the morning.", ["likes=coffee"]),
    ("I drink way too much coffee.", ["likes=coffee"]),
    ("I drink coffee like every day.", ["likes=coffee"]),
    ("im veggie", ["diet=vegetarian"]),
    ("I'm a veggie now.", ["diet=vegetarian"]),
    ("I'm not veggie anymore.", ["-diet=vegetarian"]),
])
def test_invariant_a_value_typed_casually_is_the_thing(message, expected):
    assert facts(message) == expected


@pytest.mark.parametrize("message", ["Switched to Python 3 and it broke.", "Gave up on that approach.", "Quit my job.",
                                     "Stopped working after the update.", "Dropped the table and recreated it."])
def test_invariant_a_subjectless_give_up_or_switch_of_no_known_thing_states_nothing(message):
    """A left-out "I" is read in only before a thing kinds.json knows: a report about code or a task is no fact."""
    assert detect_facts(message) == []


# ---------------------------------------------------------------- fifth round: neither-nor, reactions, two jobs, time

@pytest.mark.parametrize("message, expected", [
    ("I like neither jazz nor rock.", ["dislikes=jazz", "dislikes=rock"]),
    ("I love neither coffee nor tea.", ["dislikes=coffee", "dislikes=tea"]),
    ("I really like neither jazz nor rock.", ["dislikes=jazz", "dislikes=rock"]),
    ("I don't like jazz or rock.", ["dislikes=jazz", "dislikes=rock"]),   # what "neither ... nor" must match
])
def test_invariant_neither_nor_is_a_dislike_of_each_as_dont_like_or_is(message, expected):
    assert facts(message) == expected


@pytest.mark.parametrize("message, expected", [
    ("I eat neither meat nor fish.", ["diet=no meat or fish"]),   # as "I don't eat meat or fish."
    ("I like neither of them.", []),                              # a reaction: no fact
])
def test_neither_reads_as_its_negation_says(message, expected):
    assert facts(message) == expected


def test_neither_nor_states_each_dislike_in_its_own_sentence():
    assert statements("I like neither jazz nor rock.") == [("jazz", "I don't like jazz."),
                                                           ("rock", "I don't like rock.")]


@pytest.mark.parametrize("message", [
    "I love that idea!", "I love this song.", "I love it when it rains.", "I like these shoes.", "I love those.",
    "I love them.", "I really love that idea.", "I hate this song.", "I love that idea and I live in Oslo.",
])
def test_invariant_a_like_of_a_demonstrative_or_a_pronoun_is_a_passing_reaction_and_no_fact(message):
    assert [f for f in facts(message) if not f.startswith("home=")] == []


@pytest.mark.parametrize("message", [
    'He asked me "are you vegetarian?" and I said "yes".', 'I said "no".', "She asked and I replied.",
])
def test_invariant_reported_speech_whose_words_were_quoted_is_no_fact(message):
    assert facts(message) == []


@pytest.mark.parametrize("message, expected", [
    ("I \u2764\ufe0f jazz", ["likes=jazz"]), ("I \u2764 jazz.", ["likes=jazz"]), ("I \u2665 sushi!", ["likes=sushi"]),
    ("I \U0001F499 sushi", ["likes=sushi"]), ("I \U0001F49A tea.", ["likes=tea"]), ("I \U0001F9E1 pizza", ["likes=pizza"]),
    ("I \U0001F5A4 metal", ["likes=metal"]),   # a second tester's "I 💙 sushi" was about "I sushi": every colour
])
def test_invariant_a_heart_for_the_verb_is_love(message, expected):
    assert facts(message) == expected


@pytest.mark.parametrize("message, expected", [
    ("I'm a chef and a writer.", ["job=chef and writer"]),
    ("I'm a teacher and a writer.", ["job=teacher and writer"]),
    ("I'm a nurse and a mother.", ["job=nurse", "about=I'm a mother"]),   # one job: as before
    ("I'm a chef. I'm a writer.", ["job=writer"]),                         # two sentences: the later one holds
])
def test_invariant_two_jobs_in_one_sentence_are_both_held_never_the_last_only(message, expected):
    assert facts(message) == expected


@pytest.mark.parametrize("message, expected", [
    ("I drink coffee at 7am.", ["likes=coffee"]),
    ("I drink coffee at 7 am.", ["likes=coffee"]),
    ("I drink 3 cups of coffee a day.", ["likes=coffee"]),
    ("I drink two cups of tea a day.", ["likes=tea"]),
    ("I play tennis in summer.", ["likes=tennis"]),
    ("I go skiing in winter.", ["likes=skiing"]),
    ("I drink coffee in the morning and tea at night.", ["likes=coffee", "likes=tea"]),
    ("I often listen to jazz at night.", ["likes=jazz"]),
    ("I sometimes drink tea.", ["likes=tea"]),
    ("I'm sometimes vegetarian.", ["about=I'm sometimes vegetarian"]),   # a part-time diet is no diet
    ("I go swimming twice a week.", ["likes=swimming"]),
    ("I'm a nurse at night.", ["job=nurse"]),
    ("I'm a waiter on weekends.", ["job=waiter"]),
])
def test_invariant_a_clock_time_a_season_or_a_count_per_day_is_no_part_of_the_value(message, expected):
    assert facts(message) == expected


@pytest.mark.parametrize("message, expected", [
    ("I go shopping twice a week.", ["about=I go shopping twice a week"]),   # no thing kinds.json knows: as before
    ("I hate working on weekends.", ["dislikes=working on weekends"]),
])
def test_invariant_a_time_that_is_the_thing_or_an_unknown_habit_stays_as_said(message, expected):
    assert facts(message) == expected


@pytest.mark.parametrize("message, expected", [
    ("I'm more into rock than jazz these days.", ["~likes=rock"]),
    ("I like rock more than jazz.", ["likes=rock"]),
    ("I love Better Than Ezra.", ["likes=Better Than Ezra"]),   # a name's "Than" compares nothing
])
def test_invariant_what_a_like_is_compared_with_is_no_part_of_its_value(message, expected):
    assert facts(message) == expected


@pytest.mark.parametrize("message, expected", [
    ("My favourite book is Gone with the Wind.", ["favourite book=Gone with the Wind"]),
    ("My favorite song is Stand by Me.", ["favourite song=Stand by Me"]),
    ("My favorite movie is When Harry Met Sally.", ["favourite movie=When Harry Met Sally"]),
    ("My favorite food is pizza because it is cheesy.", ["favourite food=pizza"]),
    ("My favorite sport is tennis, which I play weekly.", ["favourite sport=tennis"]),
    ("My favorite drink is tea with my breakfast.", ["favourite drink=tea"]),
])
def test_invariant_a_favourite_title_keeps_its_words_and_a_clause_after_it_goes(message, expected):
    """The "favourite" exemption from value cutting never applied (the attribute is "favourite <thing>" by then), so
    "Gone with the Wind" was held as "Gone" (found on detect.py's mutation run): a title's small words stay, a
    clause after it (because, which, with my ...) goes."""
    assert facts(message) == expected
