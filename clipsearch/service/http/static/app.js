// The clipsearch search page: plain JS against the service's own API, nothing from a network.
"use strict";

const K = 24;
const $ = (id) => document.getElementById(id);
let apiKey = localStorage.getItem("clipsearch-api-key") || "";

async function api(path, { json, form } = {}) {
  const headers = { accept: "application/json" };
  if (apiKey) headers.authorization = `Bearer ${apiKey}`;
  let body;
  if (json !== undefined) { headers["content-type"] = "application/json"; body = JSON.stringify(json); }
  if (form !== undefined) body = form;
  const response = await fetch(path, { method: body === undefined ? "GET" : "POST", headers, body });
  const data = await response.json().catch(() => ({}));
  if (response.status === 401) $("key-form").hidden = false;
  if (!response.ok) {
    const error = new Error((data.error && data.error.message) || `HTTP ${response.status}`);
    error.status = response.status;
    throw error;
  }
  return data;
}

function say(text) { $("status").textContent = text; }

// The metadata filter typed in the page, as the API takes it (undefined: none).
function currentFilter() {
  const text = $("filter").value.trim();
  if (!text) return undefined;
  try {
    return JSON.parse(text);
  } catch (error) {
    throw new Error(`the filter is not JSON (${error.message})`);
  }
}

function clear() {
  for (const id of ["images", "texts"]) $(id).replaceChildren();
  $("images-heading").hidden = $("texts-heading").hidden = true;
}

function metaLine(hit) {
  const parts = [hit.score.toFixed(3)];
  const folded = (hit.duplicates || []).length;
  if (folded) parts.push(`${folded} near-duplicate${folded === 1 ? "" : "s"} folded in`);
  for (const [key, value] of Object.entries(hit.metadata || {})) parts.push(`${key}: ${JSON.stringify(value)}`);
  return parts.join(" · ");
}

async function thumbnailInto(img, url) {
  if (!apiKey) { img.src = url; return; }  // a plain <img> sends no key: fetch it with one
  const response = await fetch(url, { headers: { authorization: `Bearer ${apiKey}` } });
  if (response.ok) img.src = URL.createObjectURL(await response.blob());
}

function showImages(hits) {
  const list = $("images");
  list.replaceChildren();
  $("images-heading").hidden = hits.length === 0;
  for (const hit of hits) {
    const caption = hit.text || hit.id;
    const button = document.createElement("button");
    button.type = "button";
    button.dataset.id = hit.id;
    button.setAttribute("aria-label", `More like this: ${caption}`);
    if (hit.thumbnail) {
      const img = document.createElement("img");
      img.alt = caption;
      img.loading = "lazy";
      thumbnailInto(img, hit.thumbnail);
      button.append(img);
    } else {
      const none = document.createElement("span");
      none.className = "placeholder";
      none.textContent = "no thumbnail";
      button.append(none);
    }
    const text = document.createElement("span");
    text.className = "caption";
    text.textContent = caption;
    const meta = document.createElement("span");
    meta.className = "meta";
    meta.textContent = metaLine(hit);
    button.append(text, meta);
    button.addEventListener("click", () => moreLike(hit.id, caption));
    const item = document.createElement("li");
    item.append(button);
    list.append(item);
  }
}

function showTexts(hits) {
  const list = $("texts");
  list.replaceChildren();
  $("texts-heading").hidden = hits.length === 0;
  for (const hit of hits) {
    const item = document.createElement("li");
    const text = document.createElement("span");
    text.className = "text";
    text.textContent = hit.text || hit.id;
    const score = document.createElement("span");
    score.className = "score";
    score.textContent = hit.score.toFixed(3);
    item.append(text, " ", score);
    list.append(item);
  }
}

async function run(label, work) {
  say(`Searching ${label}…`);
  try {
    const count = await work();
    say(`${count} results for ${label}`);
  } catch (error) {
    say(`Error: ${error.message}`);
  }
}

function searchText(text) {
  clear();
  $("query-image").hidden = true;
  return run(`“${text}”`, async () => {
    const mode = $("mode").value;
    const json = { text, k: K, filter: currentFilter(), mode };
    if (mode === "vector") json.dedup = $("dedup").checked;  // folding goes by vectors
    const data = await api("/search/text", { json });
    showImages(data.results);
    return data.results.length;
  });
}

function moreLike(id, caption) {
  clear();
  return run(`more like “${caption}”`, async () => {
    const data = await api("/search/similar", {
      json: { id, modality: "image", k: K, filter: currentFilter(), dedup: $("dedup").checked },
    });
    showImages(data.results);
    window.scrollTo({ top: 0 });
    return data.results.length;
  });
}

function searchImage(file) {
  if (!file || !file.type.startsWith("image/")) { say("That is not an image file."); return; }
  clear();
  const preview = $("query-image");
  preview.src = URL.createObjectURL(file);
  preview.hidden = false;
  return run(`the image ${file.name || "pasted"}`, async () => {
    const ask = (target) => {
      const form = new FormData();
      form.append("image", file, file.name || "pasted.png");
      form.append("k", String(K));
      form.append("target", target);
      const filter = currentFilter();
      if (filter !== undefined) form.append("filter", JSON.stringify(filter));
      if ($("dedup").checked) form.append("dedup", "true");
      return api("/search/image", { form }).then((d) => d.results, (e) => (e.status === 503 ? [] : Promise.reject(e)));
    };
    const [images, texts] = await Promise.all([ask("image"), ask("text")]);
    showImages(images);
    showTexts(texts);
    return images.length + texts.length;
  });
}

async function about() {
  try {
    const info = await api("/");
    const counts = info.index ? Object.entries(info.index.counts).map(([m, n]) => `${n} ${m}s`).join(", ") : "no index";
    const model = typeof info.model === "string" ? info.model : info.model.spec;
    $("about").textContent = `${model} · ${counts}`;
  } catch (error) {
    $("about").textContent = error.message;
  }
}

$("search").addEventListener("submit", (event) => {
  event.preventDefault();
  const text = $("query").value.trim();
  if (text) searchText(text);
});
$("file").addEventListener("change", (event) => searchImage(event.target.files[0]));
const drop = $("drop");
drop.addEventListener("dragover", (event) => { event.preventDefault(); drop.classList.add("over"); });
drop.addEventListener("dragleave", () => drop.classList.remove("over"));
drop.addEventListener("drop", (event) => {
  event.preventDefault();
  drop.classList.remove("over");
  searchImage(event.dataTransfer.files[0]);
});
document.addEventListener("paste", (event) => {
  const file = [...(event.clipboardData ? event.clipboardData.files : [])][0];
  if (file) searchImage(file);
});
$("key-form").addEventListener("submit", (event) => {
  event.preventDefault();
  apiKey = $("key").value.trim();
  localStorage.setItem("clipsearch-api-key", apiKey);
  $("key-form").hidden = true;
  about();
});
about();
