"""langchain-openai's ChatOpenAI against localpers, unchanged: invoke, stream, with_structured_output and
bind_tools on the default model, personalized in each of the three ways; OpenAIEmbeddings on /v1/embeddings."""
import pytest
from clients_helpers import City, HEADER, WAYS, WEATHER, model_for, server_fixture, stored

langchain_openai = pytest.importorskip("langchain_openai")

server = server_fixture()


@pytest.mark.parametrize("way", WAYS)
def test_chat_stream_structured_tools_served_as_the_user(server, way):
    user = f"lc-{way}"
    llm = langchain_openai.ChatOpenAI(
        base_url=server.url + "/v1", api_key="unused", model=model_for(way, user, "gpt-4o-mini"), temperature=0,
        max_tokens=40, max_retries=0, default_headers={HEADER: user} if way == "header" else None,
        model_kwargs={"user": user} if way == "field" else {})
    said = f"Hello from langchain ({way})"
    reply = llm.invoke(said)
    assert reply.content
    assert "".join(chunk.content for chunk in llm.stream(said)) == reply.content
    city = llm.with_structured_output(City).invoke("Where is the Eiffel Tower?")
    assert isinstance(city, City)
    called = llm.bind_tools([WEATHER], tool_choice="get_weather").invoke("What is the weather in Paris?")
    assert called.tool_calls[0]["name"] == "get_weather" and "city" in called.tool_calls[0]["args"]
    assert said in stored(server.store, user)


def test_embeddings(server):
    embedder = langchain_openai.OpenAIEmbeddings(base_url=server.url + "/v1", api_key="unused",
                                                 model="text-embedding-3-small", check_embedding_ctx_length=False)
    vectors = embedder.embed_documents(["I like the sea.", "The weather is fine."])
    assert len(vectors) == 2 and len(vectors[0]) == server.engine.n_embd
    assert abs(sum(x * x for x in embedder.embed_query("sea")) - 1) < 1e-3  # normalized
