// receiver's dashboard: the little the server cannot do. No inline script (the page's CSP).

// Times arrive as UTC ISO in <time datetime>: show the viewer's local time, UTC on hover.
for (const el of document.querySelectorAll("time[datetime]")) {
  const when = new Date(el.dateTime);
  if (!Number.isNaN(when.getTime())) {
    el.title = el.dateTime;
    el.textContent = when.toLocaleString();
  }
}

// Ids are one click to copy (they are also shown whole and select-all on click).
document.addEventListener("click", (e) => {
  const button = e.target.closest("button[data-copy]");
  if (!button || !navigator.clipboard) return;
  navigator.clipboard.writeText(button.dataset.copy).then(() => {
    button.textContent = "copied";
    setTimeout(() => { button.textContent = "copy"; }, 1200);
  });
});

// Time filters: typed and shown in the viewer's zone, sent as UTC. The server fills each
// input with the UTC time (what a page without script shows) and `data-utc` with the instant.
function localInputValue(when) {
  const pad = (n) => String(n).padStart(2, "0");
  return `${when.getFullYear()}-${pad(when.getMonth() + 1)}-${pad(when.getDate())}` +
    `T${pad(when.getHours())}:${pad(when.getMinutes())}:${pad(when.getSeconds())}`;
}
for (const input of document.querySelectorAll("input[data-utc]")) {
  const when = new Date(input.dataset.utc);
  if (input.dataset.utc && !Number.isNaN(when.getTime())) input.value = localInputValue(when);
  input.closest("label")?.setAttribute("title", `In your time zone (${Intl.DateTimeFormat().resolvedOptions().timeZone})`);
}
document.addEventListener("submit", (e) => {
  for (const input of e.target.querySelectorAll("input[data-utc]")) {
    const when = new Date(input.value); // a datetime-local value is local time
    if (!input.value || Number.isNaN(when.getTime())) continue;
    const sent = document.createElement("input");
    sent.type = "hidden";
    sent.name = input.name;
    sent.value = when.toISOString();
    input.removeAttribute("name");
    e.target.appendChild(sent);
  }
});
