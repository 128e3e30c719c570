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
